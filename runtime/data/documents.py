"""Reading the documents of `lmspec data prepare`'s inputs (text files, JSON Lines, JSON arrays and
folders of them) into a stream that tallies the problems inside files rather than stopping at them."""
from __future__ import annotations

import json
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lmspec.runtime.data.cleaning import decode_utf8, drop_surrogates
from lmspec.runtime.data.report import Tally
from lmspec.runtime.data.sniff import refuse_non_text
from lmspec.runtime.errors import DataError

TEXT_SUFFIXES = (".txt",)
JSON_SUFFIXES = (".jsonl", ".json")


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
    not searched. A file that is not text (runtime/data/sniff.py) is refused by name."""
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
    for path in files:  # before any is read: a compressed or binary input is a mistake to fix first
        refuse_non_text(path)
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
    text, surrogates = drop_surrogates(text)
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
