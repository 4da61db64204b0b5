"""Collect, clean and deduplicate text: the first stage of `lmspec data prepare`.

    prepare(["corpus/", "extra.jsonl"], "prepared/")  ->  prepared/documents.jsonl, prepared/report.json

Inputs are text files (one document each), JSON Lines files (one document per line, the text in
`text_field`), JSON files holding an array of such objects, and directories of any of these
(searched recursively). Every document is
  1. decoded as UTF-8; invalid bytes are dropped and counted per file,
  2. cleaned: line endings become "\\n", control characters other than "\\n" and "\\t" are dropped,
     the text is put in Unicode NFC form and blank edges are trimmed,
  3. filtered by length (characters of the cleaned text),
  4. dropped if an earlier kept document has exactly the same text, or nearly the same words:
     MinHash signatures of word shingles, candidates from an LSH index (both from `datasketch`),
     each candidate confirmed by its estimated Jaccard similarity before anything is dropped.
The first of a group of duplicates is kept, so the output keeps the input order.

Reading streams file by file and line by line; what grows with the corpus is only the two
duplicate indexes: a 16-byte digest per document, and a MinHash signature and its LSH buckets per
kept document (about 6 KB each with datasketch's in-memory storage; `dedup_near=False` for
corpora of millions of documents on a small machine).
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import sys
import tempfile
import time
import unicodedata
from array import array
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from lmspec.runtime.data.corpus import DataError

DOCUMENTS_FILE = "documents.jsonl"
REPORT_FILE = "report.json"

TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")

MAX_EXAMPLES = 5        # bad JSON lines and near-duplicate pairs shown in the report
SNIPPET_CHARS = 120     # how much of a document an example shows
MINHASH_SEED = 1        # fixed, so the same inputs always keep the same documents
LSH_RECALL = 0.99       # chance that a pair exactly at the threshold becomes a candidate
CHANGED_WORDS_TOLERATED = 2  # substituted words a document of any length may have and still match


# ----------------------------------------------------------------------------- the stage

def prepare(
    inputs: list[str],
    out_dir: str,
    *,
    text_field: str = "text",
    min_chars: int = 1,
    max_chars: int | None = None,
    near_dup_threshold: float = 0.8,
    shingle: int = 5,
    num_perm: int = 128,
    dedup_near: bool = True,
    progress: bool = False,
) -> dict:
    """Clean and deduplicate the documents of `inputs` into `out_dir/documents.jsonl` (one
    {"text": ...} per line, in input order); write `out_dir/report.json` and return the same report
    (`format_report` prints it). A missing input raises DataError; problems inside files are
    counted in the report instead:

    documents_in = documents_out + sum(removed.values()); removed: empty (nothing left after
        cleaning), too_short / too_long (characters), exact_duplicates, near_duplicates
    skipped_files: [{path, reason}] for empty files, files that are not UTF-8 text, and JSON files
        without one usable record (those are not documents)
    bad_json_lines: {count, examples: ["path:line: reason"]}: invalid JSON, not an object, no
        string `text_field`
    invalid_utf8: {count, files: {path: count}}: bytes that were not UTF-8 (and lone surrogates
        spelled by JSON escapes), dropped
    control_chars_removed, line_endings_normalised ("\r\n" or "\r"), nfc_normalised_documents
    bytes_in (input files), bytes_out (documents.jsonl), files, inputs, output, seconds, settings
    near_duplicate_examples: the first few pairs, {similarity, kept: {index, output_index,
        source, text}, dropped: {index, source, text}}; index counts documents_in from 0
    """
    if isinstance(inputs, (str, os.PathLike)):
        inputs = [inputs]  # one path, not a list of one-character paths
    _check_settings(min_chars, max_chars, near_dup_threshold, shingle, num_perm)
    started = time.perf_counter()
    out = _make_out_dir(out_dir)
    files = list_input_files(inputs, exclude=out)
    tally = Tally()
    near = NearDuplicateIndex(near_dup_threshold, shingle, num_perm) if dedup_near else None
    sieve = Sieve(tally, min_chars, max_chars, near)
    bar = _progress_bar(sum(f.size for f in files), progress)

    documents_path = out / DOCUMENTS_FILE
    with _atomic_writer(documents_path) as sink:
        for doc in iter_input_documents(files, text_field, tally):
            bar.update(doc.size)
            text = sieve.keep(doc)
            if text is not None:
                sink.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
        sink.flush()
        # The kept side of each near-duplicate example is read back from what was just written,
        # so no document text is held in memory for the report's sake.
        _fill_kept_texts(tally.near_examples, Path(sink.name))
    bar.update(bar.total - bar.n)  # records without text were read too
    bar.close()

    report = tally.report(
        inputs=[str(p) for p in inputs],
        output=str(documents_path),
        files=len(files),
        bytes_in=sum(f.size for f in files),
        bytes_out=documents_path.stat().st_size,
        settings=dict(text_field=text_field, min_chars=min_chars, max_chars=max_chars,
                      near_dup_threshold=near_dup_threshold, shingle=shingle,
                      num_perm=num_perm, dedup_near=dedup_near),
        seconds=round(time.perf_counter() - started, 3),
    )
    with _atomic_writer(out / REPORT_FILE) as sink:
        json.dump(report, sink, ensure_ascii=False, indent=2)
        sink.write("\n")
    return report


class Sieve:
    """Decides, document by document in input order, which documents are kept, and tallies why
    each of the others is not: the first reason in the order empty, too short, too long, exact
    duplicate, near duplicate."""

    def __init__(self, tally: Tally, min_chars: int, max_chars: int | None,
                 near: NearDuplicateIndex | None):
        self.tally = tally
        self.min_chars = min_chars
        self.max_chars = max_chars
        self.exact = ExactDuplicateIndex()
        self.near = near
        self.kept = KeptDocuments()

    def keep(self, doc: Document) -> str | None:
        """The cleaned text of `doc` if it is kept, else None."""
        index = self.tally.documents_in
        self.tally.documents_in += 1
        text, counts = clean_text(doc.text)
        self.tally.count_cleaning(counts)
        reason = self._unfit(text)
        if reason is None and self.exact.seen_before(text):
            reason = "exact_duplicates"
        if reason is None and self.near is not None:
            match = self.near.find_or_add(self.kept.count, words_of(text))
            if match is not None:
                reason = "near_duplicates"
                self.tally.note_near_duplicate(match, index, doc.source, text, self.kept)
        if reason is not None:
            self.tally.removed[reason] += 1
            return None
        self.kept.add(index, doc.source)
        self.tally.documents_out += 1
        return text

    def _unfit(self, text: str) -> str | None:
        if not text:
            return "empty"
        if len(text) < self.min_chars:
            return "too_short"
        if self.max_chars is not None and len(text) > self.max_chars:
            return "too_long"
        return None


def _check_settings(min_chars, max_chars, threshold, shingle, num_perm) -> None:
    if min_chars < 0:
        raise DataError(f"min_chars must be at least 0, got {min_chars}")
    if max_chars is not None and max_chars < max(min_chars, 1):
        raise DataError(f"max_chars ({max_chars}) must be at least min_chars ({min_chars}) and 1")
    if not 0.0 < threshold < 1.0:
        raise DataError(f"near_dup_threshold must be between 0 and 1 (exclusive), got {threshold}")
    if shingle < 1:
        raise DataError(f"shingle must be at least 1 word, got {shingle}")
    if num_perm < 16:
        raise DataError(f"num_perm must be at least 16, got {num_perm}")


def _make_out_dir(out_dir: str) -> Path:
    out = Path(out_dir)
    if out.exists() and not out.is_dir():
        raise DataError(f"{out}: exists and is not a directory")
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as err:
        raise DataError(f"{out}: cannot create the output folder: {err.strerror}") from None
    return out.resolve()


class _atomic_writer:
    """A text file written under a temporary name in the same folder and moved into place only
    when complete, so a crash or Ctrl-C never leaves a half-written output behind."""

    def __init__(self, path: Path):
        self.path = path

    def __enter__(self):
        fd, temp_name = tempfile.mkstemp(dir=self.path.parent, prefix=f".{self.path.name}.", suffix=".tmp")
        os.close(fd)
        self.file = open(temp_name, "w", encoding="utf-8", newline="\n")
        return self.file

    def __exit__(self, exc_type, exc, tb) -> None:
        self.file.close()
        if exc_type is None:
            os.replace(self.file.name, self.path)
        else:
            os.unlink(self.file.name)


def _progress_bar(total_bytes: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare",
                disable=not enabled, file=sys.stderr, mininterval=0.5)


# ----------------------------------------------------------------------------- finding inputs

@dataclass(frozen=True)
class InputFile:
    path: Path
    size: int

    @property
    def is_json(self) -> bool:
        return self.path.suffix.lower() in JSON_SUFFIXES


def list_input_files(inputs: list[str], exclude: Path | None = None) -> list[InputFile]:
    """The files to read, in the order given; a directory contributes its .txt/.jsonl/.json files
    (recursively, in path order: a/x.txt, b/c/y.txt, b/z.txt, w.txt). Hidden files and folders,
    and anything under `exclude` (the output folder, which may sit inside an input folder), are
    not searched."""
    if not inputs:
        raise DataError("no inputs given")
    files = []
    for given in inputs:
        path = Path(given)
        if path.is_dir():
            files.extend(_files_under(path, exclude))
        elif path.is_file():
            files.append(path)
        elif path.exists():
            raise DataError(f"{given}: not a regular file or directory")
        else:
            raise DataError(f"{given}: no such file or directory")
    return [InputFile(p, p.stat().st_size) for p in files]


def _files_under(folder: Path, exclude: Path | None) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(folder, onerror=_unreadable):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs
                         if not d.startswith(".") and (root_path / d).resolve() != exclude)
        found.extend(root_path / name for name in sorted(names)
                     if not name.startswith(".")
                     and name.lower().endswith(TEXT_SUFFIXES + JSON_SUFFIXES)
                     and (root_path / name).is_file())
    return sorted(found, key=lambda path: path.relative_to(folder).parts)


def _unreadable(err: OSError) -> None:
    # os.walk skips folders it cannot list unless told otherwise; a silently smaller corpus
    # is worse than an error.
    raise DataError(f"{err.filename}: cannot read: {err.strerror}")


# ----------------------------------------------------------------------------- reading

@dataclass
class Document:
    text: str     # decoded, not yet cleaned
    source: str   # "path", "path:line" (JSON Lines) or "path[index]" (a JSON array)
    size: int     # bytes it took in its file, for the progress bar


def iter_input_documents(files: list[InputFile], text_field: str, tally: Tally) -> Iterator[Document]:
    """Every document of `files` in order; problems are recorded in `tally`, never raised."""
    for file in files:
        if file.size == 0:
            tally.skip(file.path, "empty file")
            continue
        if file.is_json:
            yield from _read_json_documents(file, text_field, tally)
        else:
            yield from _read_text_document(file, tally)


def _read_text_document(file: InputFile, tally: Tally) -> Iterator[Document]:
    text, invalid = decode_utf8(_read_bytes(file.path))
    tally.invalid_utf8(file.path, invalid)
    # A file mostly made of invalid bytes is binary or in another encoding: what would be left of
    # it after dropping those bytes is not text worth keeping.
    if invalid * 2 > file.size or not text:
        tally.skip(file.path, f"not UTF-8 text ({invalid} of {file.size} bytes invalid)")
        return
    yield Document(text.removeprefix("\ufeff"), str(file.path), file.size)


def _read_json_documents(file: InputFile, text_field: str, tally: Tally) -> Iterator[Document]:
    count = 0
    if _first_byte(file.path) == b"[":
        documents = _read_json_array(file, text_field, tally)
    else:
        documents = _read_json_lines(file, text_field, tally)
    for doc in documents:
        count += 1
        yield doc
    if count == 0:
        tally.skip(file.path, f"no records with a string {text_field!r} field")


def _read_json_lines(file: InputFile, text_field: str, tally: Tally) -> Iterator[Document]:
    with _open_binary(file.path) as lines:
        for number, raw in enumerate(lines, start=1):
            line, invalid = decode_utf8(raw)
            tally.invalid_utf8(file.path, invalid)
            if number == 1:
                line = line.removeprefix("\ufeff")
            if not line.strip():
                continue  # blank lines (a trailing newline, spacing) hold no record
            source = f"{file.path}:{number}"
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                tally.bad_json(source, f"not valid JSON ({err.msg} at column {err.colno})")
                continue
            text = _text_of(record, text_field, file.path, source, tally)
            if text is not None:
                yield Document(text, source, len(raw))


def _read_json_array(file: InputFile, text_field: str, tally: Tally) -> Iterator[Document]:
    """A .json file holding one array of records (as many instruction data sets are) is read whole:
    the standard library cannot stream an array, and such files are small in practice."""
    text, invalid = decode_utf8(_read_bytes(file.path))
    tally.invalid_utf8(file.path, invalid)
    try:
        records = json.loads(text)
    except json.JSONDecodeError as err:
        tally.bad_json(f"{file.path}:{err.lineno}", f"not valid JSON ({err.msg} at column {err.colno})")
        return
    if not isinstance(records, list):
        tally.bad_json(f"{file.path}:1", "not an array of records")
        return
    average_size = file.size // max(len(records), 1)
    for index, record in enumerate(records):
        source = f"{file.path}[{index}]"
        text = _text_of(record, text_field, file.path, source, tally)
        if text is not None:
            yield Document(text, source, average_size)


def _text_of(record, text_field: str, path: Path, source: str, tally: Tally) -> str | None:
    if not isinstance(record, dict):
        tally.bad_json(source, f"not a JSON object but {type(record).__name__}")
        return None
    if text_field not in record:
        tally.bad_json(source, f"no {text_field!r} field")
        return None
    text = record[text_field]
    if not isinstance(text, str):
        tally.bad_json(source, f"field {text_field!r} is {type(text).__name__}, not a string")
        return None
    # JSON escapes can spell lone surrogates ("\ud800"), which cannot be written as UTF-8.
    text, surrogates = _drop_surrogates(text)
    tally.invalid_utf8(path, surrogates)
    return text


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror}") from None


def _open_binary(path: Path):
    try:
        return path.open("rb")
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror}") from None


def _first_byte(path: Path) -> bytes:
    """The first byte that is not whitespace or a byte-order mark."""
    with _open_binary(path) as f:
        head = f.read(4096)
    return head.removeprefix(b"\xef\xbb\xbf").lstrip()[:1]


# ----------------------------------------------------------------------------- cleaning

_SURROGATES = re.compile("[\ud800-\udfff]")
# Unicode category Cc except "\t" and "\n" ("\r" is turned into "\n" before this runs).
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[^\S\n]*\n)+")


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """The text of `raw` without its invalid UTF-8 bytes, and how many bytes were dropped.

    "surrogateescape" turns each invalid byte into one lone surrogate (U+DC80..U+DCFF), which valid
    UTF-8 can never produce, so counting and dropping them is exact; "replace" would confuse them
    with genuine U+FFFD characters in the text."""
    return _drop_surrogates(raw.decode("utf-8", errors="surrogateescape"))


def _drop_surrogates(text: str) -> tuple[str, int]:
    return _SURROGATES.subn("", text)


@dataclass
class CleaningCounts:
    control_chars: int = 0     # control characters dropped
    line_endings: int = 0      # "\r\n" or "\r" turned into "\n"
    nfc_changed: bool = False  # the text was not in NFC form


def clean_text(text: str) -> tuple[str, CleaningCounts]:
    """`text` with "\\n" line endings, no control characters but "\\n" and "\\t", in NFC form, and
    without leading blank lines or trailing whitespace (indentation of the first line stays)."""
    counts = CleaningCounts()
    counts.line_endings = text.count("\r")
    if counts.line_endings:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text, counts.control_chars = _CONTROL_CHARS.subn("", text)
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
        counts.nfc_changed = True
    return _LEADING_BLANK_LINES.sub("", text.rstrip()), counts


# ----------------------------------------------------------------------------- duplicates

class ExactDuplicateIndex:
    """Digests of every text seen (kept or dropped as a near duplicate): 16 bytes a document."""

    def __init__(self):
        self._digests: set[bytes] = set()

    def seen_before(self, text: str) -> bool:
        """True if this exact text was seen before; otherwise remember it and return False."""
        digest = hashlib.blake2b(text.encode("utf-8"), digest_size=16).digest()
        if digest in self._digests:
            return True
        self._digests.add(digest)
        return False


_WORD = re.compile(r"\w+")


def words_of(text: str) -> list[str]:
    """The words near-duplicate detection compares: runs of letters and digits, case-folded, so
    changes of punctuation, case or spacing alone do not make two documents differ."""
    return _WORD.findall(text.casefold())


def shingle_size_for(n_words: int, max_shingle: int, threshold: float, num_perm: int = 128) -> int:
    """Words per shingle for a document of `n_words` words; 0 means "too short to compare".

    Each substituted word changes up to k of a document's s = n - k + 1 shingles of k words, so m
    substituted words leave a Jaccard similarity of (s - mk) / (s + mk); that is at least J while
    k <= (n + 1) / (1 + m * (1 + J) / (1 - J)). With long shingles a short document could not lose
    a single word and stay a near duplicate, so shorter documents use shorter shingles: short
    enough that CHANGED_WORDS_TOLERATED substituted words keep J two standard errors of the
    MinHash estimate above `threshold`, so such copies are found reliably, not by a coin toss
    (at 0.8 and 128 permutations: single words up to 58 words, `max_shingle` = 5 from 149).
    Documents too short for that still get single words if one changed word can keep them at
    the threshold (9 words or more at 0.8). Under that even one changed word is a fifth of the
    document: such documents are only dropped as exact copies."""
    standard_error = math.sqrt(threshold * (1.0 - threshold) / num_perm)
    reliable = min(threshold + 2.0 * standard_error, 0.99)
    size = int((n_words + 1) / (1.0 + CHANGED_WORDS_TOLERATED * _odds(reliable)))
    # (- 1e-9: at 0.8 the odds come out as 9.000000000000002, and 9 words must qualify.)
    if size == 0 and n_words + 1 >= 1.0 + _odds(threshold) - 1e-9:
        size = 1
    return min(max_shingle, size)


def _odds(similarity: float) -> float:
    """Shingles a document needs per shingle changed to stay at `similarity`: (1 + J) / (1 - J)."""
    return (1.0 + similarity) / (1.0 - similarity)


def shingles_of(words: list[str], size: int) -> set[bytes]:
    return {" ".join(words[i:i + size]).encode("utf-8") for i in range(len(words) - size + 1)}


def lsh_bands(threshold: float, num_perm: int) -> tuple[int, int]:
    """(bands, rows) for the LSH index: the longest rows (fewest chance candidates) with which a
    pair exactly at `threshold` still shares a band with probability LSH_RECALL.

    datasketch's own optimiser balances false positives against false negatives and finds only
    about 40% of the pairs at 0.8; every candidate is checked against the signatures afterwards,
    so here recall is what matters."""
    for rows in range(num_perm // 2, 0, -1):
        bands = num_perm // rows
        if bands >= 2 and 1.0 - (1.0 - threshold ** rows) ** bands >= LSH_RECALL:
            return bands, rows
    return num_perm, 1


@dataclass
class NearMatch:
    kept: int          # the kept document's position in the output
    similarity: float  # estimated Jaccard similarity of the two documents' shingles


class NearDuplicateIndex:
    """MinHash signatures of the kept documents, in one LSH index per shingle size.

    Documents are compared on shingles of the size their length calls for (`shingle_size_for`).
    A near duplicate's length is within a factor `threshold` of its original's, which can put
    the two in neighbouring size classes; so each document is also signed, indexed and looked up
    with the shingle sizes of the shortest document it could match, and a pair always meets at
    the size of the shorter one."""

    def __init__(self, threshold: float, max_shingle: int, num_perm: int):
        try:
            from datasketch import MinHash, MinHashLSH
        except ImportError as err:
            raise ImportError("near-duplicate removal needs the datasketch package "
                              "(pip install 'datasketch>=2.0,<3'); dedup_near=False works without it"
                              ) from err

        self.threshold = threshold
        self.max_shingle = max_shingle
        self.num_perm = num_perm
        self._minhash_class = MinHash
        # One set of permutations shared by every signature: creating them is the slow part of
        # making a MinHash, and signatures can only be compared when they share them.
        self._permutations = MinHash(num_perm=num_perm, seed=MINHASH_SEED).permutations
        self._bands = lsh_bands(threshold, num_perm)
        self._lsh_class = MinHashLSH
        self._lsh: dict[int, object] = {}
        self._signatures: dict[int, dict[int, np.ndarray]] = {}

    def find_or_add(self, key: int, words: list[str]) -> NearMatch | None:
        """The most similar earlier document at or above the threshold; if there is none, the
        document is indexed under `key` and None is returned."""
        sizes = self._shingle_sizes(len(words))
        signed = [(size, self._sign(words, size)) for size in sizes]
        best = None
        for size, minhash in signed:
            match = self._best_match(size, minhash)
            if match is not None and (best is None or match.similarity > best.similarity):
                best = match
        if best is None:
            for size, minhash in signed:
                self._index(size).insert(key, minhash, check_duplication=False)
                self._signatures[size][key] = minhash.hashvalues
        return best

    def _shingle_sizes(self, n_words: int) -> range:
        largest = shingle_size_for(n_words, self.max_shingle, self.threshold, self.num_perm)
        smallest = shingle_size_for(math.floor(n_words * self.threshold), self.max_shingle,
                                    self.threshold, self.num_perm)
        return range(max(smallest, 1), largest + 1)

    def _sign(self, words: list[str], size: int):
        minhash = self._minhash_class(num_perm=self.num_perm, permutations=self._permutations,
                                      scheme="affine32")
        minhash.update_batch(shingles_of(words, size))
        return minhash

    def _best_match(self, size: int, minhash) -> NearMatch | None:
        if size not in self._lsh:
            return None
        signatures = self._signatures[size]
        best = None
        for key in self._lsh[size].query(minhash):
            # The share of equal signature entries estimates the Jaccard similarity; LSH only
            # says the two share a band, which unrelated documents sometimes do.
            similarity = float(np.count_nonzero(signatures[key] == minhash.hashvalues)) / self.num_perm
            if similarity >= self.threshold and (
                best is None or (similarity, -key) > (best.similarity, -best.kept)
            ):
                best = NearMatch(key, similarity)
        return best

    def _index(self, size: int):
        if size not in self._lsh:
            self._lsh[size] = self._lsh_class(num_perm=self.num_perm, params=self._bands)
            self._signatures[size] = {}
        return self._lsh[size]


class KeptDocuments:
    """Where each kept document came from (its input position and source), for the report."""

    def __init__(self):
        self.input_index = array("q")
        self.sources: list[str] = []

    @property
    def count(self) -> int:
        return len(self.input_index)

    def add(self, input_index: int, source: str) -> None:
        self.input_index.append(input_index)
        self.sources.append(source)


# ----------------------------------------------------------------------------- the report

@dataclass
class Tally:
    """What happened to every document and file, gathered while streaming."""

    documents_in: int = 0
    documents_out: int = 0
    removed: dict = field(default_factory=lambda: dict.fromkeys(
        ("exact_duplicates", "near_duplicates", "too_short", "too_long", "empty"), 0))
    skipped_files: list = field(default_factory=list)
    bad_json_count: int = 0
    bad_json_examples: list = field(default_factory=list)
    invalid_utf8_files: dict = field(default_factory=dict)
    control_chars_removed: int = 0
    line_endings_normalised: int = 0
    nfc_normalised_documents: int = 0
    near_examples: list = field(default_factory=list)

    def count_cleaning(self, counts: CleaningCounts) -> None:
        self.control_chars_removed += counts.control_chars
        self.line_endings_normalised += counts.line_endings
        self.nfc_normalised_documents += counts.nfc_changed

    def skip(self, path: Path, reason: str) -> None:
        self.skipped_files.append({"path": str(path), "reason": reason})

    def bad_json(self, source: str, reason: str) -> None:
        self.bad_json_count += 1
        if len(self.bad_json_examples) < MAX_EXAMPLES:
            self.bad_json_examples.append(f"{source}: {reason}")

    def invalid_utf8(self, path: Path, count: int) -> None:
        if count:
            key = str(path)
            self.invalid_utf8_files[key] = self.invalid_utf8_files.get(key, 0) + count

    def note_near_duplicate(self, match: NearMatch, input_index: int, source: str, text: str,
                            kept: KeptDocuments) -> None:
        if len(self.near_examples) < MAX_EXAMPLES:
            self.near_examples.append({
                "similarity": round(match.similarity, 3),
                "kept": {"index": kept.input_index[match.kept], "source": kept.sources[match.kept],
                         "output_index": match.kept},
                "dropped": {"index": input_index, "source": source, "text": _snippet(text)},
            })

    def report(self, *, inputs, output, files, bytes_in, bytes_out, settings, seconds) -> dict:
        return {
            "inputs": inputs,
            "output": output,
            "files": files,
            "documents_in": self.documents_in,
            "documents_out": self.documents_out,
            "removed": dict(self.removed),
            "skipped_files": self.skipped_files,
            "bad_json_lines": {"count": self.bad_json_count, "examples": self.bad_json_examples},
            "invalid_utf8": {"count": sum(self.invalid_utf8_files.values()),
                             "files": self.invalid_utf8_files},
            "control_chars_removed": self.control_chars_removed,
            "line_endings_normalised": self.line_endings_normalised,
            "nfc_normalised_documents": self.nfc_normalised_documents,
            "bytes_in": bytes_in,
            "bytes_out": bytes_out,
            **settings,
            "near_duplicate_examples": self.near_examples,
            "seconds": seconds,
        }


def _snippet(text: str) -> str:
    return text if len(text) <= SNIPPET_CHARS else text[:SNIPPET_CHARS - 1] + "…"


def _fill_kept_texts(examples: list[dict], written: Path) -> None:
    wanted = {example["kept"]["output_index"] for example in examples}
    if not wanted:
        return
    texts = {}
    with written.open(encoding="utf-8") as lines:
        for position, line in enumerate(lines):
            if position in wanted:
                texts[position] = _snippet(json.loads(line)["text"])
                if len(texts) == len(wanted):
                    break
    for example in examples:
        example["kept"]["text"] = texts[example["kept"]["output_index"]]


def format_report(report: dict) -> str:
    """A short printout of a `prepare` report."""
    removed = report["removed"]
    lines = [
        f"{report['documents_in']:,} documents in {report['files']:,} file(s) "
        f"({_human_bytes(report['bytes_in'])}) -> {report['documents_out']:,} kept "
        f"({_human_bytes(report['bytes_out'])}) in {report['output']}",
        "removed: " + (", ".join(f"{count:,} {reason.replace('_', ' ')}"
                                 for reason, count in removed.items() if count) or "nothing"),
    ]
    cleaning = [(report["invalid_utf8"]["count"], "invalid UTF-8 bytes"),
                (report["control_chars_removed"], "control characters"),
                (report["line_endings_normalised"], "CR line endings"),
                (report["nfc_normalised_documents"], "documents put in NFC form")]
    if any(count for count, _ in cleaning):
        lines.append("cleaned: " + ", ".join(f"{count:,} {what}" for count, what in cleaning if count))
    invalid = [f"  {path}: {count:,} invalid UTF-8 bytes dropped"
               for path, count in report["invalid_utf8"]["files"].items()]
    lines.extend(_at_most(MAX_EXAMPLES, invalid, "files with invalid UTF-8"))
    skipped = [f"skipped {s['path']}: {s['reason']}" for s in report["skipped_files"]]
    lines.extend(_at_most(MAX_EXAMPLES, skipped, "skipped files"))
    bad = report["bad_json_lines"]
    if bad["count"]:
        lines.append(f"{bad['count']:,} JSON records without usable text, e.g.")
        lines.extend(f"  {example}" for example in bad["examples"])
    for example in report["near_duplicate_examples"][:3]:
        lines.append(f"near duplicate ({example['similarity']:.2f}): {example['dropped']['source']} "
                     f"of {example['kept']['source']}")
    return "\n".join(lines)


def _at_most(limit: int, lines: list[str], what: str) -> list[str]:
    if len(lines) <= limit:
        return lines
    return lines[:limit] + [f"  … and {len(lines) - limit:,} more {what}"]


def _human_bytes(count: int) -> str:
    if count < 1000:
        return f"{count} B"
    for unit in ("KB", "MB", "GB"):
        count /= 1000
        if count < 1000 or unit == "GB":
            return f"{count:.1f} {unit}"


# ----------------------------------------------------------------------------- reading back

def iter_documents(prepared_dir: str | os.PathLike) -> Iterator[str]:
    """The texts of a prepared folder's documents.jsonl, one at a time, in order."""
    path = Path(prepared_dir) / DOCUMENTS_FILE
    if not path.is_file():
        raise DataError(f"{path}: no such file; run `lmspec data prepare` first")
    with path.open(encoding="utf-8") as lines:
        for number, line in enumerate(lines, start=1):
            try:
                yield json.loads(line)["text"]
            except (json.JSONDecodeError, KeyError, TypeError):
                raise DataError(f"{path}:{number}: not a prepared document record") from None
