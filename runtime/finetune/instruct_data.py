"""Instruction data for finetuning: records read and checked, formatted with a prompt template,
tokenized into (prompt, response) pieces, split, bucketed by length and collated with the loss
masked to the responses.

Records are Alpaca-style `{instruction, input, output}` or chat-style `{messages: [{role, content}]}`,
in a JSON list or a JSONL file. A template turns a record into segments of token ids, each marked
trained or not: only the answers and the end token after each (so the model learns to stop) are
trained; the prompt, the template's own text and the padding get target -100, which
cross-entropy ignores.

Each template is also a Jinja text (runtime/data/chat_template.py's ALPACA_JINJA and CHATML_JINJA),
recorded in the finetuned checkpoint; rendered for a conversation, it gives the prompt that training
built here, token for token (tested), so `chat`, `generate --chat` and `serve` talk to the model as it
was taught.

Prompt and answer are encoded separately and joined, so the mask boundary is exact by
construction. (With byte-level BPE this is what encoding the joined text gives too, because every
prompt ends with a newline, which GPT-2's pre-tokenizer always splits off.)
"""
from __future__ import annotations

import json
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmspec.runtime.data.chat_template import (
    CHATML_END, CHATML_START, ChatError, ChatMLTemplate, check_messages, literal_encoder
)
from lmspec.runtime.data.corpus import DataError
from lmspec.runtime.data.tokenizer import FileTokenizer, TokenizerError
from lmspec.runtime.errors import TemplateError  # noqa: F401  (raised here, and imported from here)

IGNORE = -100  # the target cross-entropy skips (F.cross_entropy's default ignore_index)
PAD_TOKEN = "<|pad|>"
TEMPLATES = ("alpaca", "chatml")

ALPACA_PREAMBLE = ("Below is an instruction that describes a task. "
                   "Write a response that appropriately completes the request.")
# With no end-of-text token (a character vocabulary), an answer ends where the next one would begin.
ALPACA_TEXT_END = "\n\n### Instruction:"


# ------------------------------------------------------------------------------------------ records

def read_records(path: str | Path, check=None) -> list[dict]:
    """The records of a JSON list or a JSONL file, each checked by `check(record, where)` (default
    check_record; preference data passes its own), which raises DataError naming the record."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read: {err}") from None
    stripped = text.lstrip()
    if stripped.startswith("["):
        try:
            records = json.loads(text)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}: not valid JSON: {err}") from None
    else:
        records = []
        for number, line in enumerate(text.splitlines(), 1):
            if line.strip():
                try:
                    records.append(json.loads(line))
                except json.JSONDecodeError as err:
                    raise DataError(f"{path}:{number}: not valid JSON: {err}") from None
    if not records:
        raise DataError(f"{path}: holds no records")
    for i, record in enumerate(records):
        (check or check_record)(record, f"{path}: record {i}")
    return records


def check_record(record: object, where: str) -> None:
    if not isinstance(record, dict):
        raise DataError(f"{where}: must be an object with instruction/output or messages")
    if "messages" in record:
        try:
            pairs = check_messages(record["messages"])
        except ChatError as err:
            raise DataError(f"{where}: {err}") from None
        if pairs[-1][0] != "assistant":
            raise DataError(f"{where}: the last message must be the assistant's answer to train on")
        return
    if "instruction" not in record:
        raise DataError(f"{where}: has neither 'instruction' nor 'messages'")
    for key in ("instruction", "input", "output"):
        if key != "input" or key in record:
            if not isinstance(record.get(key), str):
                raise DataError(f"{where}: '{key}' must be a string")


def as_messages(record: dict) -> list[tuple[str, str]]:
    """A record as (role, text) turns; an Alpaca record is one user turn (instruction, then the input
    after a blank line) and the answer."""
    if "messages" in record:
        return check_messages(record["messages"])
    user = record["instruction"] + (f"\n\n{record['input']}" if record.get("input") else "")
    return [("user", user), ("assistant", record["output"])]


def split_records(records: list, fractions: Sequence[float], seed: int) -> tuple[list, list, list]:
    """(train, val, test) after a seeded shuffle (give range(n) to split indices); train and test are rounded down as the book does
    (int(n * 0.85), int(n * 0.1)) and validation takes the rest."""
    order = list(records)
    random.Random(seed).shuffle(order)
    n_train, n_test = int(len(order) * fractions[0]), int(len(order) * fractions[2])
    return order[:n_train], order[n_train + n_test:], order[n_train:n_train + n_test]


# ---------------------------------------------------------------------------------------- templates

def format_alpaca_prompt(record: dict, preamble: str = ALPACA_PREAMBLE) -> str:
    """The book's prompt (ch07 format_input), and the response header the answer follows."""
    text = f"{preamble}\n\n### Instruction:\n{record['instruction']}"
    text += f"\n\n### Input:\n{record['input']}" if record.get("input") else ""
    return text + "\n\n### Response:\n"


@dataclass(frozen=True)
class Segment:
    ids: list[int]
    trained: bool  # an answer and its end token: the loss covers these


class AlpacaTemplate:
    """The book's format: one instruction, its optional input, the response; then the end token
    (<|endoftext|>), or ALPACA_TEXT_END's text for a vocabulary without one."""

    name = "alpaca"

    def __init__(self, tokenizer):
        self.encode = literal_encoder(tokenizer)  # "<|endoftext|>" typed in a record stays text
        if tokenizer.eot_id is not None:
            self.end_ids, self.stop_id, self.stop_text = [tokenizer.eot_id], tokenizer.eot_id, None
        else:
            self.end_ids, self.stop_id, self.stop_text = _encode_text(tokenizer.encode, ALPACA_TEXT_END), None, \
                ALPACA_TEXT_END
        _encode_text(self.encode, format_alpaca_prompt({"instruction": ""}) + "\n\n### Input:\n")  # its own text

    def prompt_of(self, record: dict) -> list[int]:
        """The ids the answer follows, as in training: everything before the last answer."""
        return _prompt_of(self.segments(record))

    def segments(self, record: dict) -> list[Segment]:
        if "messages" in record:
            record = _messages_as_alpaca(record)
        return [Segment(self.encode(format_alpaca_prompt(record)), False),
                Segment(self.encode(record["output"]) + self.end_ids, True)]


class ChatMLInstructTemplate:
    """ChatML through runtime/data/chat_template.py's renderer: every assistant turn's text and its
    <|im_end|> are trained; the other turns and each `<|im_start|>assistant\\n` header are not."""

    name = "chatml"

    def __init__(self, tokenizer):
        ids = [tokenizer.tokenizer.token_to_id(t) for t in (CHATML_START, CHATML_END)] \
            if isinstance(tokenizer, FileTokenizer) else [None, None]
        if None in ids:
            raise TemplateError(f"--template chatml needs the tokens {CHATML_START} and {CHATML_END}, which this "
                                f"tokenizer lacks (`lmspec tokenizer train` adds them); use --template alpaca")
        self.chat = ChatMLTemplate(tokenizer, *ids)
        self.end_ids, self.stop_id, self.stop_text = [ids[1]], ids[1], None

    def prompt_of(self, record: dict) -> list[int]:
        return _prompt_of(self.segments(record))

    def segments(self, record: dict) -> list[Segment]:
        messages = as_messages(record)
        segments, done = [], 0
        for k, (role, text) in enumerate(messages):
            if role != "assistant":
                continue
            prefix = self.chat.render(messages[:k]).ids  # ends with <|im_start|>assistant\n
            segments.append(Segment(prefix[done:], False))
            answer = self.chat.encode(text) + self.end_ids
            segments.append(Segment(answer, True))
            done = len(prefix) + len(answer)
        return segments


def make_template(name: str, tokenizer) -> AlpacaTemplate | ChatMLInstructTemplate:
    if name == "alpaca":
        return AlpacaTemplate(tokenizer)
    if name == "chatml":
        return ChatMLInstructTemplate(tokenizer)
    raise TemplateError(f"unknown template {name!r} (known: {', '.join(TEMPLATES)})")


def _prompt_of(segments: list[Segment]) -> list[int]:
    return [t for s in segments[:-1] for t in s.ids]


def _messages_as_alpaca(record: dict) -> dict:
    turns = as_messages(record)
    system = [t for r, t in turns if r in ("system", "developer")]
    rest = [(r, t) for r, t in turns if r not in ("system", "developer")]
    if [r for r, _ in rest] != ["user", "assistant"]:
        raise TemplateError("the alpaca template holds one question and its answer; a conversation of several "
                            "turns needs --template chatml")
    return {"instruction": rest[0][1], "input": "\n".join(system), "output": rest[1][1]}


def _encode_text(encode, text: str) -> list[int]:
    try:
        return encode(text)
    except TokenizerError as err:
        raise TemplateError(f"this vocabulary cannot write the template's {text!r}: {err}") from None


def pad_id_for(tokenizer) -> int:
    """<|pad|> when the vocabulary has it, else the end-of-text token (the book's choice), else 0;
    which one does not matter to the loss, because padded positions are never targets and, the
    padding coming after the text, causal attention keeps it from the positions that are."""
    if isinstance(tokenizer, FileTokenizer) and (pad := tokenizer.tokenizer.token_to_id(PAD_TOKEN)) is not None:
        return pad
    return tokenizer.eot_id if tokenizer.eot_id is not None else 0


# ------------------------------------------------------------------------------------------ examples

@dataclass(frozen=True)
class Example:
    ids: list[int]  # prompt and answers, joined
    trained: list[bool]  # per token: part of an answer or an end token

    def __len__(self) -> int:
        return len(self.ids)


@dataclass
class Tokenized:
    examples: list[Example | None]  # one per record, in order; None where it was left out
    truncated: int = 0  # cut at the window's end (the book's rule)
    dropped: int = 0  # nothing trained left within the window
    unencodable: int = 0  # held characters the vocabulary lacks (a character tokenizer)

    def pick(self, indices: Sequence[int]) -> list[Example]:
        return [e for e in (self.examples[i] for i in indices) if e is not None]


def tokenize_records(records: list[dict], template, max_length: int) -> Tokenized:
    """One example per record, of at most max_length + 1 tokens (the model sees max_length inputs,
    each predicting the next). Longer ones are cut at the end, as the book cuts them; an example with
    no trained token left, or whose text a character vocabulary cannot write, is left out (None)
    and counted."""
    out = Tokenized([])
    for i, record in enumerate(records):
        out.examples.append(None)
        try:
            segments = template.segments(record)
        except TokenizerError:
            out.unencodable += 1
            continue
        except TemplateError as err:
            raise TemplateError(f"record {i}: {err}") from None
        ids = [t for s in segments for t in s.ids]
        trained = [s.trained for s in segments for _ in s.ids]
        if len(ids) > max_length + 1:
            ids, trained = ids[:max_length + 1], trained[:max_length + 1]
            out.truncated += 1
        if not any(trained[1:]):
            out.dropped += 1
            continue
        out.examples[i] = Example(ids, trained)
    return out


def collate(examples: Sequence[Example], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """inputs [B, T] and targets [B, T], T the longest example less one. targets[i] is the token
    after inputs[i], or IGNORE where that token is not trained or is padding."""
    width = max(len(e) for e in examples) - 1
    inputs = torch.full((len(examples), width), pad_id, dtype=torch.long)
    targets = torch.full((len(examples), width), IGNORE, dtype=torch.long)
    for row, example in enumerate(examples):
        n = len(example) - 1
        inputs[row, :n] = torch.tensor(example.ids[:-1])
        wanted = torch.tensor(example.ids[1:])
        targets[row, :n] = torch.where(torch.tensor(example.trained[1:]), wanted, IGNORE)
    return inputs, targets


def length_buckets(lengths: Sequence[int], batch: int, seed: int, epoch: int) -> list[list[int]]:
    """One epoch's batches of indices: sorted by length (ties broken at random) and cut into batches
    of `batch`, so a batch pads little; the order of the batches is shuffled. Seeded by (seed, epoch):
    every epoch differs, every run repeats. Each index appears exactly once."""
    rng = random.Random(seed * 1_000_003 + epoch)
    tie = list(range(len(lengths)))
    rng.shuffle(tie)
    order = sorted(range(len(lengths)), key=lambda i: (lengths[i], tie[i]))
    batches = [order[i:i + batch] for i in range(0, len(order), batch)]
    rng.shuffle(batches)
    return batches


def padding_fraction(batches: Sequence[Sequence[int]], lengths: Sequence[int]) -> float:
    """The share of a batch grid that is padding."""
    cells = sum(len(b) * max(lengths[i] for i in b) for b in batches)
    return 1 - sum(lengths[i] for b in batches for i in b) / cells
