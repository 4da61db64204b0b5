"""Where training text comes from: a corpus file or directory (runtime/data/formats.py's formats), or
the built-in corpus.

The built-in corpus is the documentation text that ships inside CPython (`pydoc_data`), so
`lmspec train` works out of the box with nothing downloaded.
"""
from __future__ import annotations

import os
from pathlib import Path
from lmspec.runtime.data.sniff import refuse_non_text
from lmspec.runtime.errors import DataError  # noqa: F401  (raised here, and imported from here)


def default_corpus_text() -> str:
    """CPython's pydoc topic texts (about 465 KB of English prose and Python code)."""
    from pydoc_data.topics import topics

    return "\n\n".join(topics[key] for key in sorted(topics))


def read_text_data(path: str | os.PathLike, text_field: str = "text") -> str:
    """The documents of one corpus file (text, JSON Lines, JSON, gzip or zstd, Parquet, a datasets
    directory: runtime/data/formats.py), or of every corpus file under a directory in path order,
    joined by blank lines; JSON records and columnar rows give their `text_field`."""
    from lmspec.runtime.data.documents import list_input_files, no_corpus_files, read_documents
    from lmspec.runtime.data.formats import Strict

    path = Path(path)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    files = list_input_files([str(path)])
    if not files:
        raise DataError(no_corpus_files(path))
    strict = Strict(f"--data reads the {text_field!r} field; --text-field names another")
    parts = []
    for doc in read_documents(files, text_field, strict):
        parts += (doc.text, "\n\n") if doc.ends else (doc.text,)
    text = "".join(parts[:-1])
    if not text.strip():
        if path.is_file():
            raise DataError(f"{path}: file is empty" + (" (only white space)" if text else ""))
        raise DataError(f"{path}: holds no text")
    return text


def _read_file(path: Path) -> str:
    try:
        raw = path.read_bytes()
    except OSError as err:
        raise DataError(f"{path}: cannot read: {err.strerror}") from None
    refuse_non_text(path, raw)
    try:
        text = raw.decode("utf-8")
    except UnicodeDecodeError as err:
        raise DataError(f"{path}: not UTF-8 text (invalid byte at offset {err.start})") from None
    if not text.strip():
        raise DataError(f"{path}: file is empty" + (" (only white space)" if raw else ""))
    return text
