"""Binary token shards: a corpus tokenized once, written as flat files of token ids, read by memmap.

A shards directory holds

    meta.json        what the files hold: format version, dtype, tokenizer hash, the split rule,
                     token and document counts per split and per shard, and each shard's checksum
                     ("xxh3_128:…", taken as it is written; written last)
    tokenizer.json   the Hugging Face tokenizer the ids come from (usable as `--tokenizer`)
    train_000.bin    token ids, little-endian uint16 (vocabularies up to 65,536) or uint32,
    train_001.bin    no header: shard i is `tokens * itemsize` bytes
    ...
    val_000.bin

Every document is followed by the tokenizer's end-of-text id, so documents are separated by
`<|endoftext|>` as in GPT-2's training data. Shards are cut at exactly `shard_tokens` tokens (a
document may continue in the next shard); a training window never crosses a shard boundary.

Writing streams: documents are encoded a batch at a time by the Rust tokenizer (in parallel) and
appended to the open shard, so memory holds one batch, whatever the corpus size; a long document
may come in pieces (runtime/data/formats.py reads a long text file so), the end-of-text after its
last. Reading maps the files (`numpy.memmap`): a window costs a page fault, not a load of the corpus. A shard's checksum is
verified the first time a window is read from it (once per process, a fraction of a second per GB),
and `verify_shards` (`lmspec data verify`) checks them all; shards from before checksums are not checked.
"""
from __future__ import annotations

import contextlib

import hashlib
import json
import os
import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from fractions import Fraction
from pathlib import Path

import numpy as np
import tokenizers
import torch

from lmspec.runtime.atomic import PendingFile, failures_as_write_errors, remove_temporaries, write_text_atomically
from lmspec.runtime.checksum import Checksum, file_matches, is_checksum
from lmspec.runtime.data.corpus import DataError
from lmspec.runtime.data.formats import Document
from lmspec.runtime.data.token_data import batches_to_cover
from lmspec.runtime.data.tokenizer import EOT_TOKENS, TOKENIZER_FILE, FileTokenizer, TokenizerError

FORMAT = "lmspec-shards"
VERSION = 1
META_FILE = "meta.json"
SPLITS = ("train", "val")
DEFAULT_SHARD_TOKENS = 64 * 2**20  # 128 MiB per shard in uint16: few files, each still quick to copy
DEFAULT_BATCH_DOCS = 1024  # documents per encode_batch call: enough for the Rust thread pool
# ...but no more text than this per batch, however long the documents: a batch's ids as Python ints
# and the Rust encodings take ~40 bytes per character of text, and two batches are in flight
DEFAULT_BATCH_CHARS = 2 * 2**20
SPLIT_RULE = ("document i (counting from 0, empty documents skipped) validates when "
              "floor((i + 1) * val_fraction) > floor(i * val_fraction)")
_SHARD_NAME = re.compile(r"^(train|val)_\d{3,}\.bin$")
_OUR_FILES = re.compile(r"(train|val)_\d{3,}\.bin|meta\.json|tokenizer\.json")  # whose temporaries we clear


# ------------------------------------------------------------------------------------ writing

def write_shards(
    texts: Iterable[str | Document],
    tokenizer: FileTokenizer,
    out_dir: str | os.PathLike,
    *,
    val_fraction: float = 0.1,
    shard_tokens: int = DEFAULT_SHARD_TOKENS,
    batch_docs: int = DEFAULT_BATCH_DOCS,
    batch_chars: int = DEFAULT_BATCH_CHARS,
    dtype: str | None = None,
    allow_special: bool = False,
    overwrite: bool = False,
    progress: bool = False,
    total_bytes: int | None = None,
) -> dict:
    """Tokenize `texts` (one document each, e.g. `prepare.iter_documents(dir)`, or the Documents of
    `documents.read_documents`, whose pieces make one document until one `ends`) into shards under
    `out_dir`, and return the metadata written to meta.json.

    - Split: by document, deterministic and evenly spread: with val_fraction = 0.1 documents
      9, 19, 29, ... validate (see SPLIT_RULE); every prefix of the corpus has the same share.
    - dtype: "uint16" when the vocabulary fits in 65,536 ids, else "uint32"; may be forced.
    - allow_special=False (the default) encodes special-token text inside a document, such as a
      literal "<|endoftext|>", as plain text, so the only end-of-text ids are the separators this
      function writes (tiktoken's `encode_ordinary`, as nanoGPT prepares data). True matches them
      as special tokens, for corpora already formatted with a chat template.
    - A directory that already holds shards is refused unless overwrite=True.
    - progress=True shows bytes read (of `total_bytes`, the inputs' size, when given) and tokens per second.
    Files appear under temporary names and are renamed when complete, meta.json last: a directory
    without meta.json is unfinished, and a crash never leaves one that looks complete."""
    out_dir = Path(out_dir)
    val_split = _ValidationRule(val_fraction)
    for name, value in (("shard_tokens", shard_tokens), ("batch_docs", batch_docs), ("batch_chars", batch_chars)):
        if not isinstance(value, int) or value < 1:
            raise DataError(f"{name} must be an integer >= 1, got {value!r}")
    eot_id = tokenizer.eot_id
    if eot_id is None:
        raise TokenizerError(
            f"the {tokenizer.kind!r} tokenizer has no end-of-text token ({', '.join(EOT_TOKENS)}) to separate "
            f"documents; use a BPE tokenizer with <|endoftext|> (GPT-2's, or one from train_bpe)"
        )
    encode_batch = _batch_encoder(tokenizer, allow_special)
    vocab_size = tokenizer.vocab_size
    token_type = _choose_dtype(vocab_size, dtype)
    tokenizer_json = tokenizer.tokenizer.to_str()

    created = not out_dir.exists()
    _prepare_directory(out_dir, overwrite)
    writers = {split: _SplitWriter(out_dir, split, token_type, shard_tokens) for split in SPLITS}
    bar = _Progress(total_bytes) if progress else None
    try:
        doc_index = 0  # a document's pieces share it, and so their split
        batches = _piece_batches(_as_documents(texts), batch_docs, batch_chars)
        for batch, encoded in _encoded_ahead(batches, lambda docs: encode_batch([d.text for d in docs])):
            routed = {split: ([], []) for split in SPLITS}  # flat ids, document end offsets
            for doc, ids in zip(batch, encoded):
                split = "val" if val_split.is_validation(doc_index) else "train"
                flat, ends = routed[split]
                flat.extend(ids)
                if doc.ends:
                    flat.append(eot_id)
                    ends.append(len(flat))
                    doc_index += 1
                writers[split].text_bytes += len(doc.text.encode("utf-8"))
            for split, (flat, ends) in routed.items():
                if flat:
                    writers[split].append(_as_tokens(flat, token_type), np.asarray(ends, dtype=np.int64))
            if bar is not None:
                bar.update(sum(d.size for d in batch), sum(len(ids) for ids in encoded))
        if bar is not None:
            bar.complete()
        _check_splits(doc_index, val_split.fraction, writers)
        splits = {split: writer.finish() for split, writer in writers.items()}
        meta = {
            "format": FORMAT,
            "version": VERSION,
            "dtype": token_type.name,
            "vocab_size": vocab_size,
            "eot_id": eot_id,
            "tokenizer": {"file": TOKENIZER_FILE, "sha256": _sha256(tokenizer_json)},
            "special_tokens_in_text": "matched" if allow_special else "encoded as text",
            "split": {"val_fraction": val_split.fraction, "rule": SPLIT_RULE},
            "shard_tokens": shard_tokens,
            "tokens": sum(s["tokens"] for s in splits.values()),
            "documents": doc_index,
            "splits": splits,
        }
        write_text_atomically(out_dir / TOKENIZER_FILE, tokenizer_json)
        write_text_atomically(out_dir / META_FILE, json.dumps(meta, indent=1) + "\n")
    except BaseException:  # includes Ctrl-C: leave no shards of an unfinished run behind
        for writer in writers.values():
            writer.discard()
        (out_dir / TOKENIZER_FILE).unlink(missing_ok=True)
        if created:  # nor the directory this run made, so that the same command can simply run again
            with contextlib.suppress(OSError):
                out_dir.rmdir()
        raise
    finally:
        if bar is not None:
            bar.close()
    return meta


def document_batches(texts: Iterable[str], max_docs: int, max_chars: int) -> Iterator[list[str]]:
    """Consecutive groups of non-empty documents: at most `max_docs` of them, and no more than
    `max_chars` characters unless one document alone is longer. Memory holds one group."""
    for batch in _piece_batches(_as_documents(texts), max_docs, max_chars):
        yield [doc.text for doc in batch]


def _as_documents(texts: Iterable[str | Document]) -> Iterator[Document]:
    for i, text in enumerate(texts):
        if isinstance(text, Document):
            yield text
        elif isinstance(text, str):
            yield Document(text, f"document {i}", len(text.encode("utf-8")))
        else:
            raise DataError(f"document {i} is a {type(text).__name__}, not a str")


def _piece_batches(docs: Iterator[Document], max_docs: int, max_chars: int) -> Iterator[list[Document]]:
    """document_batches over Documents, which may be pieces of one; an empty last piece stays, to
    carry its document's end."""
    batch: list[Document] = []
    chars, inside = 0, False
    for doc in docs:
        if not doc.text and not (doc.ends and inside):
            continue  # an empty document would add a lone end-of-text token and nothing to learn
        inside = not doc.ends
        if batch and (len(batch) >= max_docs or chars + len(doc.text) > max_chars):
            yield batch
            batch, chars = [], 0
        batch.append(doc)
        chars += len(doc.text)
    if batch:
        yield batch


# Little-endian whatever the machine, so shards written on one machine read the same on any other.
TOKEN_TYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}


def token_dtype(vocab_size: int) -> np.dtype:
    """The smallest unsigned type that holds every id of a vocabulary."""
    return TOKEN_TYPES["uint16"] if vocab_size <= 2**16 else TOKEN_TYPES["uint32"]


class _ValidationRule:
    """Which documents validate: exactly floor(n * f) of the first n, for every n, spread evenly.
    Decided by position alone, so the same corpus in the same order always splits the same way."""

    def __init__(self, val_fraction: float):
        if not isinstance(val_fraction, (int, float)) or not 0 <= val_fraction < 1:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
        self.fraction = float(val_fraction)
        # Exact decimal arithmetic: with floats, 100 * 0.57 is 56.99999999999999.
        exact = Fraction(repr(self.fraction))
        self._num, self._den = exact.numerator, exact.denominator

    def is_validation(self, index: int) -> bool:
        return (index + 1) * self._num // self._den > index * self._num // self._den


def _check_splits(documents: int, val_fraction: float, writers: dict) -> None:
    """An empty corpus, or a validation split asked for and left empty, is a mistake to fix before any
    shard is kept; the message names the option that fixes it."""
    if documents == 0:
        raise DataError("the corpus holds no document with text: nothing to tokenize")
    if val_fraction > 0 and writers["val"].text_bytes == 0:  # empty documents never reach a split
        raise DataError(f"no document goes to validation: {documents} document(s) x --val-fraction {val_fraction:g} "
                        f"< 1; give more documents, a larger --val-fraction, or --val-fraction 0 for none")


def _batch_encoder(tokenizer, allow_special: bool):
    """A function from a list of documents to their lists of ids, through the Rust batch encoder."""
    hf = getattr(tokenizer, "tokenizer", None)
    if not isinstance(hf, tokenizers.Tokenizer):
        raise TokenizerError(f"shards need a Hugging Face tokenizers tokenizer, got a {tokenizer.kind!r} tokenizer")
    # A private copy, so that the settings below do not leak into the caller's tokenizer.
    hf = tokenizers.Tokenizer.from_str(hf.to_str())
    hf.no_truncation()  # a tokenizer.json may carry a max_length that would cut documents silently
    hf.no_padding()
    if not allow_special:
        hf.encode_special_tokens = True
    # encode_batch_fast (tokenizers >= 0.21) skips computing character offsets, which nothing here uses.
    encode = getattr(hf, "encode_batch_fast", hf.encode_batch)

    def encode_batch(docs: list[str]) -> list[list[int]]:
        return [encoding.ids for encoding in encode(docs, add_special_tokens=False)]

    return encode_batch


def _encoded_ahead(batches: Iterator[list[str]], encode_batch) -> Iterator[tuple[list[str], list[list[int]]]]:
    """(batch, its ids) pairs, the next batch encoding in a worker thread while the caller writes
    this one: the Rust encoder releases the GIL, so the Python work of routing and writing ids
    overlaps the encoding instead of following it. Holds at most two batches."""
    from concurrent.futures import ThreadPoolExecutor

    with ThreadPoolExecutor(max_workers=1, thread_name_prefix="encode") as pool:
        pending = None
        for batch in batches:
            submitted = (batch, pool.submit(encode_batch, batch))
            if pending is not None:
                yield pending[0], pending[1].result()
            pending = submitted
        if pending is not None:
            yield pending[0], pending[1].result()


def _choose_dtype(vocab_size: int, forced: str | None) -> np.dtype:
    if forced is None:
        return token_dtype(vocab_size)
    if forced not in TOKEN_TYPES:
        raise DataError(f"dtype must be 'uint16' or 'uint32', got {forced!r}")
    if forced == "uint16" and vocab_size > 2**16:
        raise DataError(f"dtype uint16 cannot hold the ids of a vocabulary of {vocab_size:,}")
    return TOKEN_TYPES[forced]


def _as_tokens(flat: list[int], token_type: np.dtype) -> np.ndarray:
    ids = np.array(flat, dtype=TOKEN_TYPES["uint32"])
    # Checked, not trusted: numpy before 2.0 wraps out-of-range ids silently on the cast below.
    if token_type.itemsize == 2 and int(ids.max()) > 0xFFFF:
        raise TokenizerError(f"token id {int(ids.max())} does not fit uint16; write the shards as uint32")
    return ids if token_type.itemsize == 4 else ids.astype(token_type)


class _SplitWriter:
    """Appends one split's tokens to shard files of `shard_tokens` each, under temporary names."""

    def __init__(self, directory: Path, split: str, token_type: np.dtype, shard_tokens: int):
        self.directory, self.split, self.token_type, self.shard_tokens = directory, split, token_type, shard_tokens
        self.shards: list[dict] = []
        self.text_bytes = 0
        self._pending: PendingFile | None = None
        self._checksum: Checksum | None = None  # of the open shard, taken from the bytes as they are written
        self._tokens = 0  # in the open shard
        self._documents = 0  # ending in the open shard
        self._finished: list[Path] = []

    def append(self, ids: np.ndarray, doc_ends: np.ndarray) -> None:
        """Write `ids`; `doc_ends` are the offsets just past each document's end-of-text token."""
        pos = 0
        while pos < len(ids):
            if self._pending is None:
                self._open()
            take = min(len(ids) - pos, self.shard_tokens - self._tokens)
            piece = memoryview(ids[pos:pos + take])
            with failures_as_write_errors(self._pending.path):  # a full disk: named, not a bare errno
                self._pending.file.write(piece)
            self._checksum.update(piece)
            # A document belongs to the shard that holds its end-of-text token.
            ended = np.searchsorted(doc_ends, pos + take, "right") - np.searchsorted(doc_ends, pos, "right")
            self._documents += int(ended)
            self._tokens += take
            pos += take
            if self._tokens == self.shard_tokens:
                self._close()

    def finish(self) -> dict:
        if self._pending is not None:
            self._close()
        return {
            "tokens": sum(s["tokens"] for s in self.shards),
            "documents": sum(s["documents"] for s in self.shards),
            "text_bytes": self.text_bytes,
            "shards": self.shards,
        }

    def discard(self) -> None:
        if self._pending is not None:
            self._pending.discard()
        for path in self._finished:
            path.unlink(missing_ok=True)

    def _open(self) -> None:
        self._pending = PendingFile(self.directory / f"{self.split}_{len(self.shards):03d}.bin")
        self._checksum = Checksum()
        self._tokens = self._documents = 0

    def _close(self) -> None:
        self._pending.commit()
        self._finished.append(self._pending.path)
        self.shards.append({"file": self._pending.path.name, "tokens": self._tokens, "documents": self._documents,
                            "checksum": self._checksum.value()})
        self._pending = None


def _prepare_directory(out_dir: Path, overwrite: bool) -> None:
    """Create `out_dir`, or empty it of an earlier run's shards when overwrite=True."""
    if out_dir.exists() and not out_dir.is_dir():
        raise DataError(f"{out_dir}: exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    remove_temporaries(out_dir, of=_OUR_FILES)  # of a writer that was killed: unfinished, never to be renamed
    meta_path = out_dir / META_FILE
    old_shards = [p for p in out_dir.iterdir() if _SHARD_NAME.match(p.name)]
    if not meta_path.exists() and not old_shards:
        return
    if not overwrite:
        raise DataError(f"{out_dir}: already holds token shards; choose another directory or overwrite them")
    if meta_path.exists():
        try:
            ours = json.loads(meta_path.read_text(encoding="utf-8")).get("format") == FORMAT
        except (OSError, ValueError, AttributeError):
            ours = False
        if not ours:
            raise DataError(f"{meta_path}: is not a token shards index; not overwriting it, choose another directory")
        meta_path.unlink()  # first: from here on the directory reads as unfinished, never as a mix
    for path in old_shards:
        path.unlink()


class _Progress:
    """A bar of the bytes read, with the tokens written per second beside it."""

    def __init__(self, total_bytes: int | None):
        import time

        from tqdm.auto import tqdm

        self._clock = time.perf_counter
        self._start, self._tokens = self._clock(), 0
        self.bar = tqdm(total=total_bytes, unit="B", unit_scale=True, unit_divisor=1024, desc="tokenize",
                        dynamic_ncols=True, mininterval=0.5)

    def update(self, read_bytes: int, tokens: int) -> None:
        self._tokens += tokens
        rate = self._tokens / max(self._clock() - self._start, 1e-9)
        self.bar.set_postfix_str(f"{self._tokens:,} tokens, {rate:,.0f} tokens/s", refresh=False)
        self.bar.update(read_bytes)

    def complete(self) -> None:
        if self.bar.total is not None and self.bar.n < self.bar.total:
            self.bar.update(self.bar.total - self.bar.n)  # records without text were read too

    def close(self) -> None:
        self.bar.close()


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()






# ------------------------------------------------------------------------------------ reading

def read_meta(directory: str | os.PathLike) -> dict:
    """meta.json of a shards directory, checked for the fields and types readers rely on."""
    path = Path(directory) / META_FILE
    if not Path(directory).is_dir():
        raise DataError(f"{directory}: no such shards directory")
    if not path.is_file():
        raise DataError(f"{path}: missing; not a shards directory, or its writing did not finish")
    try:
        meta = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as err:
        raise DataError(f"{path}: unreadable or not JSON: {err}") from None

    def need(ok: bool, what: str) -> None:
        if not ok:
            raise DataError(f"{path}: corrupt: {what}")

    need(isinstance(meta, dict) and meta.get("format") == FORMAT, f"format is not {FORMAT!r}")
    need(meta.get("version") == VERSION,
         f"version {meta.get('version')!r} is not {VERSION} (written by another lmspec version?)")
    need(meta.get("dtype") in TOKEN_TYPES, f"dtype {meta.get('dtype')!r} is not uint16 or uint32")
    need(_is_count(meta.get("vocab_size")) and _is_count(meta.get("eot_id")), "vocab_size or eot_id missing")
    tok = meta.get("tokenizer")
    need(isinstance(tok, dict) and isinstance(tok.get("file"), str) and isinstance(tok.get("sha256"), str),
         "no tokenizer file and sha256")
    need(_is_plain_name(tok["file"]), f"tokenizer file {tok['file']!r} is not a plain file name")
    splits = meta.get("splits")
    need(isinstance(splits, dict) and all(s in splits for s in SPLITS), "no train and val splits")
    for split in SPLITS:
        info = splits[split]
        need(isinstance(info, dict) and isinstance(info.get("shards"), list), f"{split}: no list of shards")
        for shard in info["shards"]:
            need(isinstance(shard, dict) and isinstance(shard.get("file"), str) and _is_plain_name(shard["file"])
                 and _is_count(shard.get("tokens")) and shard["tokens"] > 0
                 and ("checksum" not in shard or is_checksum(shard["checksum"])), f"{split}: bad shard entry {shard!r}")
        need(info.get("tokens") == sum(s["tokens"] for s in info["shards"]),
             f"{split}: tokens {info.get('tokens')!r} is not the sum of its shards'")
    return meta


_REWRITE_ADVICE = "tokenize the corpus again (`lmspec data tokenize … --overwrite`) or restore the file from a copy"


def shard_problem(path: Path, recorded: str) -> str | None:
    """What is wrong with a shard file given its recorded checksum, or None when it matches."""
    try:
        return None if file_matches(path, recorded) else "checksum mismatch (the shard is corrupt)"
    except ValueError as err:  # an algorithm this lmspec does not know
        return f"cannot be verified: {err}"
    except OSError as err:
        return "missing" if isinstance(err, FileNotFoundError) else f"unreadable ({err.strerror or err})"


@dataclass
class ShardsReport:
    """What verify_shards found in a shards directory."""

    path: Path
    checked: int = 0  # files whose checksum was compared (shards, and tokenizer.json by its sha256)
    problems: list[tuple[Path, str]] = field(default_factory=list)  # (file, what is wrong)
    unrecorded: int = 0  # shards written before lmspec recorded checksums: their size alone is checked

    @property
    def unchecked(self) -> str:
        """Why part of it could not be verified; empty when every file was."""
        return (f"{self.unrecorded} shards have no checksums (written before lmspec recorded them): only their "
                f"sizes were checked") if self.unrecorded else ""


def verify_shards(directory: str | os.PathLike) -> ShardsReport:
    """Check every file of a shards directory: each shard's size and checksum, and tokenizer.json
    against its sha256. Reads every shard whole; finds every problem, not just the first."""
    directory = Path(directory)
    meta = read_meta(directory)
    token_type = TOKEN_TYPES[meta["dtype"]]
    report = ShardsReport(directory)
    for split in SPLITS:
        for entry in meta["splits"][split]["shards"]:
            path = directory / entry["file"]
            expected = entry["tokens"] * token_type.itemsize
            if not path.is_file():
                report.problems.append((path, "missing"))
                continue
            if path.stat().st_size != expected:
                report.problems.append((path, f"{path.stat().st_size:,} bytes, but meta.json says {expected:,}"))
                continue
            if "checksum" not in entry:
                report.unrecorded += 1
                continue
            report.checked += 1
            problem = shard_problem(path, entry["checksum"])
            if problem is not None:
                report.problems.append((path, problem))
    tokenizer = directory / meta["tokenizer"]["file"]
    report.checked += 1
    try:
        if hashlib.sha256(tokenizer.read_bytes()).hexdigest() != meta["tokenizer"]["sha256"]:
            report.problems.append((tokenizer, "does not match the sha256 in meta.json"))
    except OSError as err:
        report.problems.append((tokenizer, "missing" if isinstance(err, FileNotFoundError) else f"unreadable ({err})"))
    return report


def is_shards_directory(path: str | os.PathLike) -> bool:
    """Whether `path` is meant as a directory of token shards: its meta.json says so, or it holds
    shard files (whose meta.json may be what is damaged), rather than a run or anything else."""
    path = Path(path)
    try:
        if json.loads((path / META_FILE).read_text(encoding="utf-8")).get("format") == FORMAT:
            return True
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        pass
    return path.is_dir() and any(_SHARD_NAME.match(p.name) for p in path.iterdir())


def _is_count(value) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value >= 0


def _is_plain_name(name: str) -> bool:
    return bool(name) and Path(name).name == name and name not in (".", "..")


class ShardSplit:
    """One split's shards, memory-mapped. A window is named by one index over every window start
    that fits inside a shard, so windows drawn uniformly are uniform over the whole split."""

    def __init__(self, name: str, shards: list[np.ndarray], checksums: dict[int, tuple[Path, str]] | None = None):
        self.name = name  # "training" or "validation", for messages
        self.shards = shards
        self._counts: dict[int, np.ndarray] = {}  # window starts per shard, by sequence length
        # shard index -> (its file, its recorded checksum), until the first window read from it verifies it
        self._unverified = dict(checksums or {})

    @classmethod
    def open(cls, directory: Path, info: dict, token_type: np.dtype, name: str) -> ShardSplit:
        shards = []
        for entry in info["shards"]:
            path = directory / entry["file"]
            expected = entry["tokens"] * token_type.itemsize
            try:
                size = path.stat().st_size
            except OSError:
                raise DataError(f"{path}: missing; meta.json lists it with {entry['tokens']:,} tokens") from None
            if size != expected:
                raise DataError(f"{path}: {size:,} bytes, but meta.json says {entry['tokens']:,} {token_type.name} "
                                f"tokens ({expected:,} bytes); the shard is truncated or from another run")
            shards.append(np.memmap(path, dtype=token_type, mode="r"))
        checksums = {i: (directory / e["file"], e["checksum"]) for i, e in enumerate(info["shards"]) if "checksum" in e}
        return cls(name, shards, checksums)

    def __len__(self) -> int:
        return sum(len(s) for s in self.shards)

    def _verify(self, shard: int) -> None:
        """Check a shard against its checksum before its first window is used: DataError naming it."""
        path, recorded = self._unverified[shard]
        problem = shard_problem(path, recorded)
        if problem is not None:
            raise DataError(f"{path}: {problem}; {_REWRITE_ADVICE}")
        del self._unverified[shard]

    def window_counts(self, seq: int) -> np.ndarray:
        """Window starts per shard: a window reads seq + 1 tokens (inputs and the shifted targets)."""
        if seq not in self._counts:
            self._counts[seq] = np.array([max(0, len(s) - seq) for s in self.shards], dtype=np.int64)
        return self._counts[seq]

    def check_fits(self, seq: int) -> int:
        """The number of windows of `seq` tokens; a clear error when there are none."""
        if seq < 1:
            raise DataError(f"sequence length must be positive, got {seq}")
        total = int(self.window_counts(seq).sum())
        if total == 0:
            longest = max((len(s) for s in self.shards), default=0)
            where = f" (its longest shard has {longest:,})" if len(self.shards) > 1 else ""
            raise DataError(f"the {self.name} split has {len(self):,} tokens{where}, fewer than sequence length "
                            f"+ 1 = {seq + 1}; use more data or a shorter sequence")
        return total

    def windows(self, indices: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
        """The windows with these global indices: x[i] the tokens, y[i] the same shifted by one."""
        counts = self.window_counts(seq)
        ends = np.cumsum(counts)
        idx = indices.numpy().astype(np.int64)
        shard_of = np.searchsorted(ends, idx, side="right")
        if self._unverified:
            for shard in set(shard_of.tolist()) & self._unverified.keys():
                self._verify(shard)
        offset = idx - (ends[shard_of] - counts[shard_of])
        rows = np.empty((len(idx), seq + 1), dtype=np.int64)
        for row, (s, o) in enumerate(zip(shard_of.tolist(), offset.tolist())):
            rows[row] = self.shards[s][o:o + seq + 1]  # copies only these pages out of the map
        both = torch.from_numpy(rows)
        return both[:, :-1].contiguous(), both[:, 1:].contiguous()


class ShardData:
    """Training and validation windows read from a shards directory: the same interface as
    `data.TokenData` (`train`, `val`, `check_seq`, `train_batch`, `val_batches`), so `train.train`
    takes either.

    Under torchrun, each rank opens the directory with its rank and the world size. Every rank draws
    the windows of the whole global batch (batch * world_size) from the training generator, which
    all ranks seed alike, and keeps its own slice of them: ranks see different windows, their
    generators stay in step (so a checkpoint of rank 0's generator resumes every rank exactly), and
    a world of N ranks trains on the same windows as one process with N times the batch.
    Validation ignores the rank: every rank gets the same fixed windows."""

    def __init__(self, directory: str | os.PathLike, rank: int = 0, world_size: int = 1):
        if not (isinstance(world_size, int) and world_size >= 1 and isinstance(rank, int) and 0 <= rank < world_size):
            raise DataError(f"rank must be in [0, world_size), got rank {rank!r} of world size {world_size!r}")
        self.directory = Path(directory)
        self.rank, self.world_size = rank, world_size
        self.meta = read_meta(self.directory)
        token_type = TOKEN_TYPES[self.meta["dtype"]]
        self.train = ShardSplit.open(self.directory, self.meta["splits"]["train"], token_type, "training")
        self.val = ShardSplit.open(self.directory, self.meta["splits"]["val"], token_type, "validation")
        self.eot_id: int = self.meta["eot_id"]
        self.vocab_size: int = self.meta["vocab_size"]
        self.tokenizer_sha256: str = self.meta["tokenizer"]["sha256"]

    def __len__(self) -> int:
        return len(self.train) + len(self.val)

    def tokenizer(self) -> FileTokenizer:
        """The tokenizer the shards were written with, checked against the hash in meta.json."""
        path = self.directory / self.meta["tokenizer"]["file"]
        try:
            text = path.read_text(encoding="utf-8")
        except (OSError, UnicodeDecodeError) as err:
            raise DataError(f"{path}: cannot read the shards' tokenizer: {err}") from None
        if _sha256(text) != self.tokenizer_sha256:
            raise DataError(f"{path}: does not match the sha256 in meta.json; the shards were written with "
                            f"another tokenizer")
        return FileTokenizer.from_str(text, source=str(path))

    def check_seq(self, seq: int, validation: bool = True) -> None:
        """Fail early, before training starts, when a window of `seq` tokens does not fit."""
        self.train.check_fits(seq)
        if validation:
            self.val.check_fits(seq)

    def train_batch(self, batch: int, seq: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's `batch` random training windows; y is x shifted left by one token."""
        total = self.train.check_fits(seq)
        drawn = torch.randint(total, (batch * self.world_size,), generator=generator)
        mine = drawn[self.rank * batch:(self.rank + 1) * batch]
        return self.train.windows(mine, seq)

    def val_batches(self, batch: int, seq: int, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same validation windows every call and on every rank, evenly spaced over the split;
        no random generator is touched."""
        total = self.val.check_fits(seq)
        n_batches = batches_to_cover(n_batches, batch, total)
        count = batch * n_batches
        # float64: float32 steps are too coarse past 2**24 windows and could point past the end.
        indices = torch.linspace(0, total - 1, count, dtype=torch.float64).round().long()
        return [self.val.windows(indices[i * batch:(i + 1) * batch], seq) for i in range(n_batches)]
