"""Training a byte-level BPE tokenizer (GPT-2's kind) with Hugging Face `tokenizers`.

Byte-level means the 256 byte values are all in the vocabulary from the start, so any text encodes
and decodes back to the same bytes, whatever characters the training text happened to hold.
The special tokens are added first, so their ids are 0, 1, 2, ... in the order given, whatever
the corpus: a chat template or a data pipeline can rely on them.
"""
from __future__ import annotations

import os
from collections.abc import Iterable, Iterator
from pathlib import Path

import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from lmspec.runtime.atomic import write_text_atomically
from lmspec.runtime.data.tokenizer import FileTokenizer, TokenizerError

DEFAULT_SPECIAL_TOKENS = ("<|endoftext|>", "<|pad|>", "<|im_start|>", "<|im_end|>")
BYTE_ALPHABET_SIZE = 256
LARGEST_VOCAB = 2**24  # far above any model's (Gemma 3: 262,144), and within what the trainer can allocate


def train_bpe(
    files_or_texts: str | os.PathLike | Iterable[str | os.PathLike] | Iterator[str],
    vocab_size: int,
    out_path: str | os.PathLike,
    special_tokens: Iterable[str] = DEFAULT_SPECIAL_TOKENS,
    min_frequency: int = 2,
    progress: bool = False,
) -> FileTokenizer:
    """Train a byte-level BPE of `vocab_size` tokens (specials and the 256 bytes included), save it as
    a tokenizers JSON file at `out_path` (atomically: a crash leaves no half-written file) and
    return it.

    `files_or_texts` is where the text comes from:
    - a path (str or PathLike) to a text file, or to a directory whose *.txt files are all read;
    - a list or tuple of such paths;
    - any other iterable, such as a generator or `iter(list_of_texts)`: the texts themselves, e.g.
      the documents of a prepared corpus; they are streamed, never all held in memory.
    A list of texts is taken for a list of paths: wrap it in `iter()`.
    Merges that occur fewer than `min_frequency` times are not learnt, so a small corpus may give a
    smaller vocabulary than asked for."""
    specials = _check_special_tokens(special_tokens)
    smallest = BYTE_ALPHABET_SIZE + len(specials)
    if not isinstance(vocab_size, int) or vocab_size < smallest:
        raise TokenizerError(
            f"vocab_size must be at least {smallest} (256 bytes + {len(specials)} special tokens), got {vocab_size!r}"
        )
    if vocab_size > LARGEST_VOCAB:  # the Rust trainer aborts the process on a size it cannot allocate
        raise TokenizerError(f"vocab_size must be at most {LARGEST_VOCAB:,} (2^24), got {vocab_size:,}")
    if not isinstance(min_frequency, int) or min_frequency < 1:
        raise TokenizerError(f"min_frequency must be an integer >= 1, got {min_frequency!r}")

    tok = tokenizers.Tokenizer(models.BPE())
    # GPT-2's set-up: split on its regex, map bytes to printable characters, no prefix space, so that
    # decode(encode(text)) == text exactly.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=specials,  # added first: ids 0..len-1, marked special
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),  # all 256 bytes, seen or not
        show_progress=progress,
    )
    files = _training_files(files_or_texts)
    try:
        if files is not None:
            tok.train(files, trainer)
        else:
            tok.train_from_iterator(_only_texts(files_or_texts), trainer)
    except TokenizerError:
        raise
    except Exception as err:  # the Rust side raises bare Exceptions (e.g. a file that is not UTF-8)
        raise TokenizerError(f"training the BPE tokenizer failed: {err}") from None

    out_path = Path(out_path)
    write_text_atomically(out_path, tok.to_str())
    return FileTokenizer(tok, source=str(out_path))


def _check_special_tokens(special_tokens: Iterable[str]) -> list[str]:
    if isinstance(special_tokens, str):
        raise TokenizerError("special_tokens must be a list of strings, not one string")
    specials = list(special_tokens)
    for token in specials:
        if not isinstance(token, str) or not token:
            raise TokenizerError(f"special tokens must be non-empty strings, got {token!r}")
    if len(set(specials)) != len(specials):
        raise TokenizerError(f"special tokens must be distinct, got {specials}")
    return specials


def _training_files(source) -> list[str] | None:
    """The text files to train on, checked to exist; None when `source` is an iterator of texts."""
    if isinstance(source, (str, os.PathLike)):
        paths = [source]
    elif isinstance(source, (list, tuple)):
        paths = list(source)
    else:
        return None
    if not paths:
        raise TokenizerError("no training files given")
    files: list[str] = []
    for path in paths:
        if not isinstance(path, (str, os.PathLike)):
            raise TokenizerError(f"training files must be paths, got {type(path).__name__}")
        path = Path(path)
        if path.is_dir():
            found = sorted(str(p) for p in path.rglob("*.txt") if p.is_file())
            if not found:
                raise TokenizerError(f"{path}: directory holds no .txt files")
            files.extend(found)
        elif path.is_file():
            files.append(str(path))
        else:
            looks_like_text = "\n" in str(path) or len(str(path)) > 255
            hint = " (to train on texts, pass an iterator: iter(texts))" if looks_like_text else ""
            raise TokenizerError(f"{_short(str(path))}: no such training file{hint}")
    return files


def _only_texts(texts: Iterable) -> Iterator[str]:
    for i, text in enumerate(texts):
        if not isinstance(text, str):
            raise TokenizerError(f"training text {i} is a {type(text).__name__}, not a str")
        yield text


def _short(text: str, limit: int = 80) -> str:
    return text if len(text) <= limit else repr(text[:limit]) + "..."
