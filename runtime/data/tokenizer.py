"""Tokenizers: characters of the training text, or a Hugging Face `tokenizers` tokenizer.

A Hugging Face tokenizer comes from its JSON file, or from GPT-2's own vocabulary files
(`encoder.json` + `vocab.bpe`), built with the same BPE model so that it gives exactly GPT-2's ids.
Both kinds serialise to one JSON string with a "kind" field, so a checkpoint carries the exact
tokenizer it was trained with and `load_tokenizer` rebuilds it without the original files.
"""
from __future__ import annotations

import json
import os

import tokenizers
from tokenizers import AddedToken, decoders, models, pre_tokenizers, processors
from lmspec.runtime.errors import TokenizerError  # noqa: F401  (raised here, and imported from here)

# The special token that ends a document in GPT-2-style vocabularies; generation stops on it.
EOT_TOKENS = ("<|endoftext|>", "</s>", "<|end_of_text|>", "<eos>")

# The file a directory holding a Hugging Face tokenizer names it by.
TOKENIZER_FILE = "tokenizer.json"
# Vocabulary + merges pairs of byte-level BPE files: OpenAI's GPT-2 release, and Hugging Face's copy.
BPE_FILE_PAIRS = (("encoder.json", "vocab.bpe"), ("vocab.json", "merges.txt"))


class CharTokenizer:
    """One token per distinct character of the training text, numbered in sorted order (nanoGPT's)."""

    kind = "char"
    eot_id = None  # a character vocabulary has no end-of-text token

    def __init__(self, chars: str):
        if not chars:
            raise TokenizerError("a character tokenizer needs at least one character")
        if len(set(chars)) != len(chars):
            raise TokenizerError("a character tokenizer's characters must be distinct")
        self.chars = chars
        self._ids = {ch: i for i, ch in enumerate(chars)}

    @classmethod
    def from_text(cls, text: str) -> CharTokenizer:
        return cls("".join(sorted(set(text))))

    @property
    def vocab_size(self) -> int:
        return len(self.chars)

    def encode(self, text: str) -> list[int]:
        ids = self._ids
        try:
            return [ids[ch] for ch in text]
        except KeyError as err:
            ch = err.args[0]
            at = text.index(ch)
            line, column = text.count("\n", 0, at) + 1, at - text.rfind("\n", 0, at)
            raise TokenizerError(
                f"character {ch!r} (U+{ord(ch):04X}) at line {line}, column {column} is not in the tokenizer's "
                f"vocabulary of {self.vocab_size} characters"
            ) from None

    def decode(self, ids: list[int]) -> str:
        chars = self.chars
        try:
            return "".join(chars[i] for i in ids)
        except IndexError:
            bad = next(i for i in ids if not 0 <= i < len(chars))
            raise TokenizerError(f"token id {bad} is outside the vocabulary of {self.vocab_size}") from None

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "chars": self.chars})


class FileTokenizer:
    """A Hugging Face `tokenizers` tokenizer (BPE, WordPiece, ...) loaded from its JSON form."""

    kind = "hf"

    def __init__(self, tokenizer: tokenizers.Tokenizer, source: str = "<tokenizer>"):
        self.tokenizer = tokenizer
        self.source = source
        self.eot_id = next(
            (tid for tid in (tokenizer.token_to_id(t) for t in EOT_TOKENS) if tid is not None), None
        )

    @classmethod
    def from_file(cls, path: str | os.PathLike) -> FileTokenizer:
        path = os.fspath(path)
        if not os.path.isfile(path):
            raise TokenizerError(f"{path}: no such tokenizer file")
        try:
            with open(path, encoding="utf-8") as f:
                text = f.read()
        except (OSError, UnicodeDecodeError) as err:
            raise TokenizerError(f"{path}: cannot read tokenizer file: {err}") from None
        return cls.from_str(text, source=path)

    @classmethod
    def from_path(cls, path: str | os.PathLike) -> FileTokenizer:
        """A tokenizers JSON file; a directory holding `tokenizer.json`; or a directory holding
        GPT-2-style byte-level BPE files (`encoder.json` + `vocab.bpe`, or `vocab.json` + `merges.txt`)."""
        path = os.fspath(path)
        if os.path.isfile(path):
            return cls.from_file(path)
        if not os.path.isdir(path):
            raise TokenizerError(f"{path}: no such tokenizer file or directory")
        if os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
            return cls.from_file(os.path.join(path, TOKENIZER_FILE))
        for vocab, merges in BPE_FILE_PAIRS:
            if os.path.isfile(os.path.join(path, vocab)):
                return cls.from_bpe_files(os.path.join(path, vocab), os.path.join(path, merges))
        expected = ", ".join([TOKENIZER_FILE] + [f"{v} + {m}" for v, m in BPE_FILE_PAIRS])
        raise TokenizerError(f"{path}: directory holds no tokenizer (expected {expected})")

    @classmethod
    def from_bpe_files(cls, vocab_path: str | os.PathLike, merges_path: str | os.PathLike) -> FileTokenizer:
        """GPT-2's tokenizer from its released vocabulary (token -> id JSON) and merges list.

        Built the way Hugging Face builds GPT-2's: byte-level pre-tokenizer without a prefix space
        (GPT-2's regex split), no normaliser, byte-level decoder, so ids equal GPT-2's and decoding
        gives back the exact bytes. End-of-text tokens in the vocabulary are marked special: they keep
        their ids (50256 for GPT-2) and are matched as one token, never split into pieces."""
        vocab_path, merges_path = os.fspath(vocab_path), os.fspath(merges_path)
        for file in (vocab_path, merges_path):
            if not os.path.isfile(file):
                raise TokenizerError(f"{file}: no such vocabulary file")
        try:
            tok = tokenizers.Tokenizer(models.BPE.from_file(vocab_path, merges_path))
        except Exception as err:  # the Rust side raises a bare Exception for malformed files
            raise TokenizerError(f"{vocab_path}, {merges_path}: not a BPE vocabulary and merges list: {err}") from None
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tok.post_processor = processors.ByteLevel(trim_offsets=False)  # as Hugging Face's gpt2; offsets only
        specials = [AddedToken(t, special=True, normalized=False) for t in EOT_TOKENS if tok.token_to_id(t) is not None]
        tok.add_special_tokens(specials)
        return cls(tok, source=os.path.dirname(vocab_path) or vocab_path)

    @classmethod
    def from_str(cls, text: str, source: str = "<tokenizer>") -> FileTokenizer:
        try:
            tok = tokenizers.Tokenizer.from_str(text)
        except Exception as err:  # the Rust side raises a bare Exception for malformed JSON
            raise TokenizerError(f"{source}: not a Hugging Face tokenizers JSON file: {err}") from None
        return cls(tok, source)

    @property
    def vocab_size(self) -> int:
        return self.tokenizer.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=False).ids

    def decode(self, ids: list[int]) -> str:
        return self.tokenizer.decode(list(ids), skip_special_tokens=False)

    def to_json(self) -> str:
        return json.dumps({"kind": self.kind, "tokenizer": self.tokenizer.to_str()})


def load_tokenizer(serialised: str) -> CharTokenizer | FileTokenizer:
    """Rebuild a tokenizer from the string its `to_json()` returned."""
    try:
        data = json.loads(serialised)
    except json.JSONDecodeError as err:
        raise TokenizerError(f"serialised tokenizer is not valid JSON: {err}") from None
    kind = data.get("kind") if isinstance(data, dict) else None
    if kind == CharTokenizer.kind:
        if not isinstance(data.get("chars"), str):
            raise TokenizerError("serialised char tokenizer has no 'chars' string")
        return CharTokenizer(data["chars"])
    if kind == FileTokenizer.kind:
        if not isinstance(data.get("tokenizer"), str):
            raise TokenizerError("serialised tokenizer of kind 'hf' has no 'tokenizer' string")
        return FileTokenizer.from_str(data["tokenizer"], source="serialised tokenizer")
    raise TokenizerError(f"serialised tokenizer has unknown kind {kind!r} (expected 'char' or 'hf')")
