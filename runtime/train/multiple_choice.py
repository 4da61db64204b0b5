"""A language model's multiple-choice accuracy as lm-evaluation-harness computes it, for `lmspec eval`.

Each item is a context, its choices and the index of the right one. A choice is scored by the summed
log-probability of its tokens after the context's, tokenized as lm-eval's `TemplateLM._encode_pair`
does: whitespace at the end of the context moves to the front of the choice, the context is
encoded alone and with the choice, and the choice's tokens are those of the whole after the
context's own count. The model reads the context's tokens then the choice's; a sequence longer than
the model's context keeps its last context + 1 tokens (lm-eval's `HFLM`), the context being cut on
the left. As in lm-eval's `ConfigurableTask.process_results` (the first best wins a tie):
`acc` picks the highest sum, `acc_norm` the highest sum per character of the choice as written,
`acc_bytes` the highest sum per UTF-8 byte of it.
"""
from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from lmspec.runtime.distributed.device import to_device
from lmspec.runtime.errors import DataError, TokenizerError

ANSWER_FIELDS = ("answer", "gold", "label")  # "gold" and "label" are read when "answer" is absent


@dataclass(frozen=True)
class Item:
    """One question: `answer` indexes `choices`; `line` is its line in the file, for errors."""
    context: str
    choices: tuple[str, ...]
    answer: int
    line: int = 0


@dataclass
class Scores:
    """Per item, each choice's summed log-probability; and how many choices lost context on the left."""
    items: list[Item]
    loglikelihoods: list[list[float]]
    truncated: int = 0

    def accuracy(self, norm: Callable[[str], float] = lambda choice: 1.0) -> float:
        """The share of items whose best choice, by log-probability / norm(choice), is the answer."""
        right = sum(_first_best([ll / norm(c) for ll, c in zip(lls, item.choices)]) == item.answer
                    for item, lls in zip(self.items, self.loglikelihoods))
        return right / len(self.items)

    def summary(self) -> dict:
        return {"items": len(self.items), "choices": sum(len(i.choices) for i in self.items),
                "acc": self.accuracy(), "acc_norm": self.accuracy(len),
                "acc_bytes": self.accuracy(lambda c: len(c.encode("utf-8"))), "truncated": self.truncated}


def _first_best(values: Sequence[float]) -> int:
    """numpy.argmax: the index of the largest value, the first of equals."""
    return max(range(len(values)), key=values.__getitem__)


def read_items(path: str | Path) -> list[Item]:
    """The items of a JSONL file, one object a line ({"context": str, "choices": [str, ...],
    "answer": int}); blank lines are skipped. A DataError names the file and line of a bad one."""
    path = Path(path)
    if not path.is_file():
        raise DataError(f"{path}: no such file")
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except (OSError, UnicodeDecodeError) as err:
        raise DataError(f"{path}: cannot read: {err}") from None
    items = [_item(line, f"{path}:{number}", number) for number, line in enumerate(lines, 1) if line.strip()]
    if not items:
        raise DataError(f"{path}: holds no items")
    return items


def _item(line: str, where: str, number: int) -> Item:
    try:
        record = json.loads(line)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: not valid JSON ({err.msg} at column {err.colno})") from None
    if not isinstance(record, dict):
        raise DataError(f"{where}: must be an object with context, choices and answer")
    context, choices = record.get("context"), record.get("choices")
    if not isinstance(context, str):
        raise DataError(f"{where}: " + ("context is missing" if context is None else "context must be a string"))
    if not isinstance(choices, list) or not all(isinstance(c, str) for c in choices):
        raise DataError(f"{where}: "
                        + ("choices is missing" if choices is None else "choices must be a list of strings"))
    if not choices:
        raise DataError(f"{where}: choices is empty")
    for k, choice in enumerate(choices):
        if not choice:
            raise DataError(f"{where}: choice {k} is empty")
    field = next((f for f in ANSWER_FIELDS if f in record), None)
    if field is None:
        raise DataError(f"{where}: answer is missing (the index of the right choice)")
    answer = record[field]
    if not isinstance(answer, int) or isinstance(answer, bool):
        raise DataError(f"{where}: {field} must be an integer index into choices, not {answer!r}")
    if not 0 <= answer < len(choices):
        raise DataError(f"{where}: {field} {answer} is out of range for {len(choices)} choices "
                        f"(0 to {len(choices) - 1})")
    return Item(context, tuple(choices), answer, number)


def encode_pair(encode: Callable[[str], list[int]], context: str,
                continuation: str) -> tuple[list[int], list[int]]:
    """(context ids, continuation ids) as lm-eval's `_encode_pair` makes them for a causal model."""
    spaces = len(context) - len(context.rstrip())
    if spaces:
        context, continuation = context[:-spaces], context[-spaces:] + continuation
    whole = encode(context + continuation)
    context_ids = encode(context)
    return context_ids, whole[len(context_ids):]


def score(model: torch.nn.Module, encode: Callable[[str], list[int]], items: Sequence[Item],
          context: int | None, batch: int = 8, source: str = "<items>") -> Scores:
    """Every choice of every item scored by `model` (logits [batch, seq, vocab]) in eval mode,
    `batch` sequences a forward pass; `context` is the most tokens it reads (None: no limit)."""
    rows, truncated = [], 0
    for item in items:
        where = f"{source}:{item.line}"
        for k, choice in enumerate(item.choices):
            try:
                context_ids, choice_ids = encode_pair(encode, item.context, choice)
            except TokenizerError as err:
                raise DataError(f"{where}: {err}") from None
            if not context_ids:
                raise DataError(f"{where}: the context is empty (it must give at least one token before a choice)")
            if not choice_ids:
                raise DataError(f"{where}: choice {k} gives no tokens after the context's")
            if context is not None and len(choice_ids) > context:
                raise DataError(f"{where}: choice {k} is {len(choice_ids)} tokens, more than the model's "
                                f"context of {context}")
            ids = context_ids + choice_ids
            if context is not None and len(ids) > context + 1:
                ids, truncated = ids[-(context + 1):], truncated + 1
            rows.append((ids, len(choice_ids)))
    sums = _summed_logprobs(model, rows, batch)
    out, at = [], 0
    for item in items:
        out.append(sums[at:at + len(item.choices)])
        at += len(item.choices)
    return Scores(list(items), out, truncated)


def _summed_logprobs(model: torch.nn.Module, rows: list[tuple[list[int], int]], batch: int) -> list[float]:
    """For each (ids, n): the summed log-probability of the last n ids given those before them.
    Rows go longest first, padded on the right (a causal model's earlier positions never see it)."""
    device = next(model.parameters()).device
    order = sorted(range(len(rows)), key=lambda i: -len(rows[i][0]))
    sums = [0.0] * len(rows)
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for start in range(0, len(order), batch):
                chosen = order[start:start + batch]
                width = len(rows[chosen[0]][0]) - 1
                x = torch.zeros(len(chosen), width, dtype=torch.long)
                for r, i in enumerate(chosen):
                    ids = rows[i][0]
                    x[r, :len(ids) - 1] = torch.tensor(ids[:-1])
                logits = model(to_device(x, device))
                # every row's scored ids in one copy to the device, every row's sum in one read back
                targets = to_device(torch.tensor([t for i in chosen for t in rows[i][0][-rows[i][1]:]]), device)
                row_sums, at = [], 0
                for r, i in enumerate(chosen):
                    ids, n = rows[i]
                    end = len(ids) - 1
                    logprobs = torch.log_softmax(logits[r, end - n:end].float(), dim=-1)
                    row_sums.append(logprobs.gather(1, targets[at:at + n, None]).double().sum())
                    at += n
                for i, value in zip(chosen, torch.stack(row_sums).tolist()):
                    sums[i] = value
    finally:
        model.train(was_training)
    return sums


def evaluate(loaded, items: Sequence[Item], batch: int, source: str) -> dict:
    """`lmspec eval --multiple-choice`: a loaded checkpoint's scores on the items, as a dict."""
    from lmspec.runtime.data.tokenizer import load_tokenizer

    tokenizer = load_tokenizer(loaded.checkpoint.tokenizer)
    context = loaded.graph.context
    scores = score(loaded.model, tokenizer.encode, items, int(context) if context is not None else None, batch, source)
    return {"data": source, "context": context, **scores.summary()}
