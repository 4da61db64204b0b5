"""Output directories written whole or not at all: refused when not empty, filled beside, renamed into place."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path


def refuse_non_empty(path: Path, what: str) -> None:
    from lmspec.runtime.errors import UsageError
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise UsageError(f"{path} already exists and is not empty; {what} is never written over an existing one")


def temporary_dir(final: Path) -> Path:
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = final.parent / f".tmp-{final.name}-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    return tmp


def move_into_place(tmp: Path, final: Path) -> None:
    from lmspec.runtime.atomic import fsync_dir
    fsync_dir(tmp)
    if final.is_dir():  # empty (checked before): a rename onto it would also do, but be explicit
        final.rmdir()
    os.rename(tmp, final)
    fsync_dir(final.parent)


def write_text(path: Path, text: str) -> None:
    with open(path, "w", encoding="utf-8") as f:
        f.write(text)
        f.flush()
        os.fsync(f.fileno())


def write_json(path: Path, value) -> None:
    write_text(path, json.dumps(value, indent=2) + "\n")
