"""Telling a text file from one that is not, by its first bytes: compressed data, an archive, a
document or image format, an executable, UTF-16 text, or anything else made of control bytes. Every
reader of training text asks here first, so that such a file is refused by name rather than
ingested as a "document" of mangled bytes."""
from __future__ import annotations

import os
from pathlib import Path

from lmspec.runtime.errors import DataError

HEAD_BYTES = 8192
BINARY_SHARE = 0.08  # of control bytes in the head; random bytes have about 10%, text next to none
_CONTROL_BYTES = bytes(b for b in range(32) if b not in b"\t\n\r\f\v\x1b")  # ESC: colour codes in logs

# (magic bytes at offset 0, what the file is, what to do about it)
_SIGNATURES = [
    (b"\x1f\x8b", "gzip-compressed, not text", "decompress it first (gunzip)"),
    (b"\x28\xb5\x2f\xfd", "zstd-compressed, not text", "decompress it first (zstd -d)"),
    (b"BZh", "bzip2-compressed, not text", "decompress it first (bunzip2)"),
    (b"\xfd7zXZ\x00", "xz-compressed, not text", "decompress it first (unxz)"),
    (b"\x04\x22\x4d\x18", "lz4-compressed, not text", "decompress it first (lz4 -d)"),
    (b"PK\x03\x04", "a ZIP archive, not text", "extract it first (unzip)"),
    (b"7z\xbc\xaf\x27\x1c", "a 7-Zip archive, not text", "extract it first (7z x)"),
    (b"Rar!\x1a\x07", "a RAR archive, not text", "extract it first"),
    (b"%PDF-", "a PDF document, not text", "extract its text first (e.g. pdftotext)"),
    (b"\x89PNG\r\n\x1a\n", "a PNG image, not text", "give text files"),
    (b"\xff\xd8\xff", "a JPEG image, not text", "give text files"),
    (b"GIF8", "a GIF image, not text", "give text files"),
    (b"\x7fELF", "an executable, not text", "give text files"),
    (b"PAR1", "a Parquet file, not text", "name it .parquet to read its text column"),
    (b"SQLite format 3\x00", "an SQLite database, not text", "export its text first"),
    (b"\x93NUMPY", "a NumPy array, not text", "give text files (token shards are read from a shards directory)"),
    (b"\xff\xfe\x00\x00", "UTF-32 text, not UTF-8", "convert it to UTF-8 (iconv -f UTF-32 -t UTF-8)"),
    (b"\x00\x00\xfe\xff", "UTF-32 text, not UTF-8", "convert it to UTF-8 (iconv -f UTF-32 -t UTF-8)"),
    (b"\xff\xfe", "UTF-16 text, not UTF-8", "convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)"),
    (b"\xfe\xff", "UTF-16 text, not UTF-8", "convert it to UTF-8 (iconv -f UTF-16 -t UTF-8)"),
]


def not_text(head: bytes) -> str | None:
    """What a file starting with `head` (its first HEAD_BYTES or more) is, and what to do, when
    it is not UTF-8 text ("gzip-compressed, not text: decompress it first (gunzip)"); None when it may be."""
    for magic, what, remedy in _SIGNATURES:
        if head.startswith(magic):
            return f"{what}: {remedy}"
    if head[257:262] == b"ustar":
        return "a tar archive, not text: extract it first (tar -xf)"
    start = head[:HEAD_BYTES]
    if b"\x00" in start:  # ASCII in UTF-16 without a byte-order mark: every other byte is NUL
        if start[1::2].count(0) > len(start) // 4 or start[0::2].count(0) > len(start) // 4:
            return "UTF-16 text without a byte-order mark, not UTF-8: convert it to UTF-8 (iconv -f UTF-16LE -t UTF-8)"
    controls = len(start) - len(start.translate(None, _CONTROL_BYTES))
    if controls > BINARY_SHARE * len(start):  # text has a stray one at most; cleaning drops those
        return f"binary data ({controls} of its first {len(start)} bytes are control bytes), not text"
    return None


def refuse_non_text(path: str | os.PathLike, head: bytes | None = None) -> None:
    """Raise DataError naming `path` when its first bytes show it is not text."""
    if head is None:
        try:
            with open(path, "rb") as f:
                head = f.read(HEAD_BYTES)
        except OSError as err:
            raise DataError(f"{path}: cannot read: {err.strerror}") from None
    what = not_text(head)
    if what:
        raise DataError(f"{Path(path)}: {what}")
