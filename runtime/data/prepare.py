"""Collect, clean and deduplicate text: the first stage of `lmspec data prepare`.

    prepare(["corpus/", "extra.jsonl"], "prepared/")  ->  prepared/documents.jsonl, prepared/report.json

Inputs are text files (one document each), JSON Lines files (one document per line, the text in
`text_field`), JSON files holding an array of such objects, any of these gzip- or zstd-compressed,
Parquet files and Hugging Face `datasets` directories (a row each, the text in column `text_field`),
and directories of any of these (searched recursively); runtime/data/formats.py reads them. Every
document is
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

import json
import os
import sys
import time
from pathlib import Path
from typing import Iterator

from lmspec.runtime.atomic import atomic_file
from lmspec.runtime.data.cleaning import clean_text
from lmspec.runtime.data.dedupe import ExactDuplicateIndex, NearDuplicateIndex, words_of
from lmspec.runtime.data.documents import Document, iter_input_documents, list_input_files
from lmspec.runtime.data.report import KeptDocuments, Tally, fill_kept_texts
from lmspec.runtime.errors import DataError

DOCUMENTS_FILE = "documents.jsonl"
REPORT_FILE = "report.json"


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
    skipped_files: [{path, reason}] for empty files, files that are not UTF-8 text, JSON files
        without one usable record, Parquet files and datasets without a `text_field` column of strings
        (those are not documents)
    bad_json_lines: {count, examples: ["path:line: reason"]}: invalid JSON, not an object, no
        string `text_field` (and null texts in Parquet or datasets rows, "path[row]: reason")
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
    files = list_input_files(inputs, exclude=Path(out_dir).resolve())  # inputs refused before --out is made
    created = not Path(out_dir).exists()
    out = _make_out_dir(out_dir)
    try:
        return _prepare_into(out, files, inputs, started, text_field=text_field, min_chars=min_chars,
                             max_chars=max_chars, near_dup_threshold=near_dup_threshold, shingle=shingle,
                             num_perm=num_perm, dedup_near=dedup_near, progress=progress)
    except BaseException:
        if created and not any(out.iterdir()):
            out.rmdir()
        raise


def _prepare_into(out: Path, files: list, inputs: list, started: float, *, text_field: str, min_chars: int,
                  max_chars: int | None, near_dup_threshold: float, shingle: int, num_perm: int, dedup_near: bool,
                  progress: bool) -> dict:
    tally = Tally()
    near = NearDuplicateIndex(near_dup_threshold, shingle, num_perm) if dedup_near else None
    sieve = Sieve(tally, min_chars, max_chars, near)
    bar = _progress_bar(sum(f.size for f in files), progress)

    documents_path = out / DOCUMENTS_FILE
    try:
        with atomic_file(documents_path, "w", newline="\n") as sink:
            for doc in iter_input_documents(files, text_field, tally):
                bar.update(doc.size)
                text = sieve.keep(doc)
                if text is not None:
                    sink.write(json.dumps({"text": text}, ensure_ascii=False) + "\n")
            if tally.documents_out == 0:  # raised inside the block: nothing is written
                raise DataError(_nothing_kept(tally, files))
            sink.flush()
            # The kept side of each near-duplicate example is read back from what was just written,
            # so no document text is held in memory for the report's sake.
            fill_kept_texts(tally.near_examples, Path(sink.name))
        bar.update(bar.total - bar.n)  # records without text were read too
    finally:  # closed before an error is printed, which is then the last line
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
    with atomic_file(out / REPORT_FILE, "w", newline="\n") as sink:
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


def _nothing_kept(tally: Tally, files: list) -> str:
    """Why no document is left, and the option that would keep some."""
    removed = {reason: n for reason, n in tally.removed.items() if n}
    fixes = {"too_short": "a lower --min-chars", "too_long": "a higher --max-chars"}
    hints = [fixes[reason] for reason in removed if reason in fixes]
    # a record without the field, or a Parquet or datasets file without the column
    reasons = tally.bad_json_examples + [item["reason"] for item in tally.skipped_files]
    if any("field" in reason for reason in reasons):
        hints.append("--text-field naming the field that holds the text")
    elif tally.bad_json_count:
        hints.append("valid JSON records")
    causes = [f"{n} {reason.replace('_', ' ')}" for reason, n in removed.items()]
    causes += [f"{item['path']}: {item['reason']}" for item in tally.skipped_files[:3]]
    causes += tally.bad_json_examples[:2]
    what = (f"{tally.documents_in} document(s) in {len(files)} file(s)" if tally.documents_in
            else f"{len(files)} file(s)")
    return (f"no document is left of {what} ({'; '.join(causes) or 'nothing to read'}); nothing was written"
            + (f"; try {' or '.join(hints)}" if hints else ""))


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


def _progress_bar(total_bytes: int, enabled: bool):
    from tqdm import tqdm

    return tqdm(total=total_bytes, unit="B", unit_scale=True, desc="prepare",
                disable=not enabled, file=sys.stderr, mininterval=0.5)


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
