"""Finding a corpus's files (the files and folders given, folders searched recursively) and streaming
their documents in order through the readers of runtime/data/formats.py, with problems inside files
tallied for prepare's report or raised."""
from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

from lmspec.runtime.data.formats import (CORPUS_SUFFIXES, READS, Document, Format, Problems, Strict, identify,
                                         is_datasets_directory, read_file)
from lmspec.runtime.errors import DataError


# ----------------------------------------------------------------------------- finding inputs

@dataclass(frozen=True)
class InputFile:
    path: Path
    size: int  # bytes (of its .arrow files, for a datasets directory)
    format: Format


def list_input_files(inputs: list[str], exclude: Path | None = None) -> list[InputFile]:
    """The files to read, in the order given; a directory contributes its corpus files (.txt, .jsonl,
    .json, each also .gz or .zst, .parquet) and the datasets directories inside it (recursively, in
    path order: a/x.txt, b/c/y.txt, b/z.txt, w.txt), or is itself read as a datasets directory. Hidden
    files and folders, and anything under `exclude` (the output folder, which may sit inside an input
    folder), are not searched. A file whose bytes are not what its name says, or not text
    (runtime/data/formats.py), is refused by name before any is read."""
    if not inputs:
        raise DataError("no inputs given")
    paths = []
    for given in inputs:
        path = Path(given)
        if path.is_dir() and not is_datasets_directory(path):
            paths.extend(_files_under(path, exclude))
        elif path.is_file() or path.is_dir():
            paths.append(path)
        elif path.exists():
            raise DataError(f"{given}: not a regular file or directory")
        else:
            raise DataError(f"{given}: no such file or directory")
    # every format checked before any file is read: a compressed or binary input is a mistake to fix first
    formats = [identify(path) for path in paths]
    return [InputFile(path, _size(path, fmt), fmt) for path, fmt in zip(paths, formats)]


def _size(path: Path, fmt: Format) -> int:
    if fmt.kind == "datasets":
        return sum(f.stat().st_size for f in path.rglob("*.arrow"))
    return path.stat().st_size


def _files_under(folder: Path, exclude: Path | None) -> list[Path]:
    found = []
    for root, dirs, names in os.walk(folder, onerror=_unreadable):
        root_path = Path(root)
        dirs[:] = sorted(d for d in dirs
                         if not d.startswith(".") and (root_path / d).resolve() != exclude)
        datasets = [d for d in dirs if is_datasets_directory(root_path / d)]
        found.extend(root_path / d for d in datasets)  # read whole, as a dataset, not searched
        dirs[:] = [d for d in dirs if d not in datasets]
        found.extend(root_path / name for name in sorted(names)
                     if not name.startswith(".")
                     and name.lower().endswith(CORPUS_SUFFIXES)
                     and (root_path / name).is_file())
    return sorted(found, key=lambda path: path.relative_to(folder).parts)


def _unreadable(err: OSError) -> None:
    # os.walk skips folders it cannot list unless told otherwise; a silently smaller corpus
    # is worse than an error.
    raise DataError(f"{err.filename}: cannot read: {err.strerror}")


def no_corpus_files(folder: str | os.PathLike) -> str:
    """The message for a folder in which the search above finds nothing."""
    return f"{folder}: directory holds no .txt files nor any other corpus file; {READS}"


# ----------------------------------------------------------------------------- reading

def iter_input_documents(files: list[InputFile], text_field: str, tally: Problems) -> Iterator[Document]:
    """Every document of `files` in order, whole (a long text file's pieces joined), for `data
    prepare`; problems are recorded in `tally`, never raised."""
    for file in files:
        if file.size == 0 and file.format.kind != "datasets":
            tally.skip(file.path, "empty file")
            continue
        yield from _whole(read_file(file.path, file.format, text_field, tally))


def read_documents(files: list[InputFile], text_field: str = "text",
                   problems: Problems | None = None) -> Iterator[Document]:
    """Every document of `files` in order, a long text file in pieces (`Document.ends`), for readers
    that stream (`data tokenize`, `tokenizer train`); a problem inside a file raises DataError unless
    `problems` says otherwise. Empty files hold no document."""
    problems = problems or Strict()
    for file in files:
        if file.size or file.format.kind == "datasets":
            yield from read_file(file.path, file.format, text_field, problems)


def _whole(documents: Iterator[Document]) -> Iterator[Document]:
    pieces: list[Document] = []
    for doc in documents:
        if not doc.ends:
            pieces.append(doc)
            continue
        if pieces:
            pieces.append(doc)
            doc = Document("".join(p.text for p in pieces), pieces[0].source, sum(p.size for p in pieces))
            pieces = []
        yield doc
