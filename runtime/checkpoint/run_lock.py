"""The run lock: one process at a time writes a run directory, and a second is refused at once,
told which process holds it.

The lock is an flock(2) on RUN/.lock, which the kernel releases when its holder exits however it
exits, so the lock of a killed run is free to take: no stale lock ever needs breaking by hand.
The file names its holder (pid, host, command, start) so that a refusal can say who it is; a
holder that finishes empties it, so a name still there when the lock is taken is a killed run's.
"""
from __future__ import annotations

import fcntl
import json
import os
import shutil
import socket
import sys
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from lmspec.runtime.errors import RunLockedError, WriteError

LOCK_FILE = ".lock"


@contextmanager
def run_lock(run_dir: str | os.PathLike, say=print) -> Iterator[Path]:
    """Hold RUN's lock for the block, creating RUN if need be (and removing it again if the block
    leaves nothing in it but the lock, as a run refused before its first file does). Raises
    RunLockedError naming the holder when another live process has it."""
    run_dir = Path(run_dir)
    created = not run_dir.exists()
    try:
        run_dir.mkdir(parents=True, exist_ok=True)
        fd = os.open(run_dir / LOCK_FILE, os.O_RDWR | os.O_CREAT, 0o644)
    except OSError as err:
        raise WriteError(run_dir, err.strerror or str(err)) from None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            raise RunLockedError(f"{run_dir} is being written by {_describe(_read_holder(fd))}; wait for it to "
                                 f"finish, stop it, or choose another --out") from None
        left = _read_holder(fd)
        if left:
            say(f"{run_dir}: taking over the lock of {_describe(left)}, which is no longer running")
        _write_holder(fd, {"pid": os.getpid(), "host": socket.gethostname(), "command": " ".join(sys.argv),
                           "started": time.strftime("%Y-%m-%d %H:%M:%S")})
        try:
            yield run_dir
        finally:
            os.ftruncate(fd, 0)  # finished: the next holder finds no one to take over from
            if created and [p.name for p in run_dir.iterdir()] == [LOCK_FILE]:
                shutil.rmtree(run_dir, ignore_errors=True)
    finally:
        os.close(fd)  # releases the flock


def lock_holder(run_dir: str | os.PathLike) -> dict | None:
    """Who holds RUN's lock now (its record), or None when no live process does."""
    path = Path(run_dir) / LOCK_FILE
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return None
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            return _read_holder(fd) or {}
        fcntl.flock(fd, fcntl.LOCK_UN)
        return None
    finally:
        os.close(fd)


def _read_holder(fd: int) -> dict:
    os.lseek(fd, 0, os.SEEK_SET)
    raw = os.read(fd, 65536)
    try:
        holder = json.loads(raw) if raw.strip() else {}
    except ValueError:
        return {}
    return holder if isinstance(holder, dict) else {}


def _write_holder(fd: int, holder: dict) -> None:
    os.ftruncate(fd, 0)
    os.lseek(fd, 0, os.SEEK_SET)
    os.write(fd, (json.dumps(holder) + "\n").encode())


def _describe(holder: dict) -> str:
    if not holder.get("pid"):
        return "another process"
    where = f" on {holder['host']}" if holder.get("host") and holder["host"] != socket.gethostname() else ""
    command = f" ({holder['command']})" if holder.get("command") else ""
    since = f", since {holder['started']}" if holder.get("started") else ""
    return f"process {holder['pid']}{where}{command}{since}"
