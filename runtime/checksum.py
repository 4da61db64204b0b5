"""Checksums of files, recorded when a file is written and compared when it is read, so that a byte
flipped on disk or in a copy is an error naming the file instead of weights or tokens that load silently.

A checksum is written as `ALGORITHM:hexdigest` ("xxh3_128:9f0c…"), the algorithm beside each value so
that it can change without a new file format; files that record none are simply not checked.

    file_checksum(path)                    the checksum of a whole file, read through memory maps
    Checksum(): .update(data), .value()    the same, for a file written in pieces (token shards)
    file_matches(path, recorded)           whether a file still has the checksum recorded for it
    is_checksum(value)                     whether a recorded value has the right form

xxh3 runs at tens of GB/s on one core, so verifying a file costs a fraction of reading it; sha256 is
accepted too, for records made by tools that only have hashlib.
"""
from __future__ import annotations

import hashlib
import mmap
import os
import re

ALGORITHM = "xxh3_128"
_FORM = re.compile(r"^([a-z0-9_]+):([0-9a-f]+)$")
_WINDOW = 16 * 2**20  # a multiple of mmap.ALLOCATIONGRANULARITY, as a map's offset must be


def _new(algorithm: str):
    if algorithm in ("xxh3_128", "xxh3_64"):
        import xxhash  # here, not at the top: the slim install (check, fmt, diff) never needs it
        return getattr(xxhash, algorithm)()
    if algorithm == "sha256":
        return hashlib.sha256()
    raise ValueError(f"unknown checksum algorithm {algorithm!r} (written by a newer lmspec?)")


class Checksum:
    """A running checksum of data written in pieces: `value()` is what file_checksum gives for the file."""

    def __init__(self, algorithm: str = ALGORITHM):
        self.algorithm = algorithm
        self._hash = _new(algorithm)

    def update(self, data) -> None:
        self._hash.update(data)

    def value(self) -> str:
        return f"{self.algorithm}:{self._hash.hexdigest()}"


def file_checksum(path: str | os.PathLike, algorithm: str = ALGORITHM) -> str:
    """The checksum of the file at `path`, read through memory maps of _WINDOW bytes at a time: the
    pages come straight from the page cache, with no copy into a buffer (which would halve the speed),
    and a window is unmapped before the next, so the resident memory grows by one window, not the file."""
    checksum = Checksum(algorithm)
    with open(path, "rb") as f:
        size = os.fstat(f.fileno()).st_size
        for offset in range(0, size, _WINDOW):
            with mmap.mmap(f.fileno(), min(_WINDOW, size - offset), offset=offset, access=mmap.ACCESS_READ) as window:
                checksum.update(window)
    return checksum.value()


def is_checksum(value) -> bool:
    return isinstance(value, str) and _FORM.match(value) is not None


def algorithm_of(recorded: str) -> str:
    match = _FORM.match(recorded) if isinstance(recorded, str) else None
    if match is None:
        raise ValueError(f"{recorded!r} is not a checksum (expected ALGORITHM:HEX)")
    return match.group(1)


def file_matches(path: str | os.PathLike, recorded: str) -> bool:
    """Whether the file at `path` has the checksum `recorded`, computed with the algorithm it names.
    ValueError for a malformed record or an algorithm this lmspec does not know."""
    return file_checksum(path, algorithm_of(recorded)) == recorded
