"""Output directories written whole or not at all: refused when not empty, then built by runtime/atomic.py's
atomic_directory beside their final name and renamed into place; the files inside need no temporary name."""
from __future__ import annotations

import json
from pathlib import Path


def refuse_non_empty(path: Path, what: str) -> None:
    from lmspec.runtime.errors import UsageError
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"{path} already exists and is not empty; {what} is never written over an existing one")


def write_text(path: Path, text: str) -> None:
    path.write_text(text, encoding="utf-8")


def write_json(path: Path, value) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")
