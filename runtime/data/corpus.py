"""Where training text comes from: a file, a directory of .txt files, or the built-in corpus.

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


def read_text_data(path: str | os.PathLike) -> str:
    """The text of one file, or of every *.txt file under a directory (sorted, joined by blank lines)."""
    path = Path(path)
    if path.is_dir():
        files = sorted(p for p in path.rglob("*.txt") if p.is_file())
        if not files:
            raise DataError(f"{path}: directory holds no .txt files")
        return "\n\n".join(_read_file(p) for p in files)
    if not path.exists():
        raise DataError(f"{path}: no such file or directory")
    return _read_file(path)


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
