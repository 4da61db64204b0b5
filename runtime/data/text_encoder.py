"""Texts to token ids for a classifier, the same whether PyTorch or onnxruntime runs it (no torch
here: `lmspec classify BUNDLE` must not import it)."""
from __future__ import annotations

import unicodedata

from lmspec.runtime.data.tokenizer import CharTokenizer

REPLACEMENT_CHARS = ("?", " ")  # what a character the tokenizer lacks becomes, the first it knows
# Windows-1252 punctuation that arrives as C1 control characters in text decoded as Latin-1 (the SMS
# corpus has them): the characters they stand for.
_C1_PUNCTUATION = {"\x91": "'", "\x92": "'", "\x93": '"', "\x94": '"', "\x96": "-", "\x97": "-", "\x85": "..."}


class TextEncoder:
    """Texts to token ids for the classifier: at most `max_length` tokens (the first ones), and at
    least one. A character tokenizer maps a character it lacks to the same character without accents
    (é -> e) when it knows that one, else to '?' (or ' '), so any text can be classified; `replaced`
    counts such characters."""

    def __init__(self, tokenizer, max_length: int, pad_id: int):
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.replaced = 0
        self.pad_id = pad_id
        if isinstance(tokenizer, CharTokenizer):
            known = set(tokenizer.chars)
            self._fallback = next((c for c in REPLACEMENT_CHARS if c in known), "")
            self._known = known

    def encode(self, text: str) -> list[int]:
        if isinstance(self.tokenizer, CharTokenizer):
            text = "".join(self._known_char(ch) for ch in text)
        ids = self.tokenizer.encode(text)[:self.max_length]
        return ids or [self.pad_id]  # a text of nothing the tokenizer knows still gets one position

    def _known_char(self, ch: str) -> str:
        if ch in self._known:
            return ch
        folded = _C1_PUNCTUATION.get(ch) or unicodedata.normalize("NFKD", ch).encode("ascii", "ignore").decode()
        self.replaced += 1
        if folded and all(c in self._known for c in folded):
            return folded
        return self._fallback
