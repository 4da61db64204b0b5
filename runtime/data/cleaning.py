"""Normalising a document's text (invalid UTF-8, line endings, control characters, NFC form, blank
edges), counting each change so that the report can say what was altered."""
from __future__ import annotations

import re
import unicodedata
from dataclasses import dataclass

_SURROGATES = re.compile("[\ud800-\udfff]")
# Unicode category Cc except "\t" and "\n" ("\r" is turned into "\n" before this runs).
_CONTROL_CHARS = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f]")
_LEADING_BLANK_LINES = re.compile(r"\A(?:[^\S\n]*\n)+")


def decode_utf8(raw: bytes) -> tuple[str, int]:
    """The text of `raw` without its invalid UTF-8 bytes, and how many bytes were dropped.

    "surrogateescape" turns each invalid byte into one lone surrogate (U+DC80..U+DCFF), which valid
    UTF-8 can never produce, so counting and dropping them is exact; "replace" would confuse them
    with genuine U+FFFD characters in the text."""
    return drop_surrogates(raw.decode("utf-8", errors="surrogateescape"))


def drop_surrogates(text: str) -> tuple[str, int]:
    return _SURROGATES.subn("", text)


@dataclass
class CleaningCounts:
    control_chars: int = 0     # control characters dropped
    line_endings: int = 0      # "\r\n" or "\r" turned into "\n"
    nfc_changed: bool = False  # the text was not in NFC form


def clean_text(text: str) -> tuple[str, CleaningCounts]:
    """`text` with "\\n" line endings, no control characters but "\\n" and "\\t", in NFC form, and
    without leading blank lines or trailing whitespace (indentation of the first line stays)."""
    counts = CleaningCounts()
    counts.line_endings = text.count("\r")
    if counts.line_endings:
        text = text.replace("\r\n", "\n").replace("\r", "\n")
    text, counts.control_chars = _CONTROL_CHARS.subn("", text)
    if not unicodedata.is_normalized("NFC", text):
        text = unicodedata.normalize("NFC", text)
        counts.nfc_changed = True
    return _LEADING_BLANK_LINES.sub("", text.rstrip()), counts
