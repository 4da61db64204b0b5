"""Writing files so that a crash leaves the old file or the new one, never half of one."""
from __future__ import annotations

import os
from pathlib import Path


def temporary_name(path: Path) -> Path:
    """The name a file is written under before the rename: hidden, beside it, unique per process."""
    return path.with_name(f".tmp-{path.name}-{os.getpid()}")


def write_text_atomically(path: str | os.PathLike, text: str) -> None:
    """Write `text` to a temporary name beside `path`, flush it to disk, then rename it over `path`."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = temporary_name(path)
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def fsync_dir(path: str | os.PathLike) -> None:
    """Make renames inside `path` durable; some file systems refuse fsync on a directory, which is fine."""
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)
