"""Labelled texts for classification: reading (.tsv/.csv/.jsonl), balancing, splitting, encoding
with a checkpoint's tokenizer, and right-padded batches with each row's length.
"""
from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path

import torch

from lmspec.runtime.data.corpus import DataError, _read_file
from lmspec.runtime.errors import UsageError


@dataclass(frozen=True)
class Example:
    text: str
    label: int  # index into the label list


def parse_labels(text: str) -> list[str]:
    labels = [s.strip() for s in text.split(",") if s.strip()]
    if len(set(labels)) != len(labels):
        raise UsageError(f"--labels {text}: a label is named twice")
    if len(labels) < 2:
        raise UsageError(f"--labels {text}: a classifier needs at least two labels, comma-separated")
    return labels


def parse_split(text: str) -> tuple[float, float, float]:
    """"0.7,0.1,0.2": the train, validation and test fractions (they add up to 1; train > 0)."""
    try:
        parts = tuple(float(s) for s in text.split(","))
    except ValueError:
        parts = ()
    if len(parts) != 3 or any(p < 0 for p in parts) or parts[0] <= 0 or abs(sum(parts) - 1) > 1e-6:
        raise UsageError(f"--split {text}: expected three fractions train,validation,test that add up to 1, "
                         f"like 0.7,0.1,0.2")
    return parts


def read_examples(path: str, labels: list[str], text_field: str = "text", label_field: str = "label") -> list[Example]:
    """Labelled texts from a .tsv or .csv file (label, text per row; a first row naming `label_field`
    and `text_field` is a header that says which columns), or .jsonl (one object per line with those
    fields). A label outside `labels` is an error that names its line."""
    p = Path(path)
    suffix = p.suffix.lower()
    if suffix not in (".tsv", ".csv", ".jsonl"):
        raise DataError(f"{path}: expected a .tsv, .csv or .jsonl file")
    if not p.exists():
        raise DataError(f"{path}: no such file")
    if p.is_dir():
        raise DataError(f"{path}: is a directory, expected a .tsv, .csv or .jsonl file")
    text = _read_file(p)  # names a missing, unreadable, non-UTF-8 or empty file
    rows = _jsonl_rows(path, text, text_field, label_field) if suffix == ".jsonl" else \
        _table_rows(path, text, "\t" if suffix == ".tsv" else ",", text_field, label_field)
    index = {name: i for i, name in enumerate(labels)}
    examples = []
    for line, label, body in rows:
        if label not in index:
            raise DataError(f"{path}:{line}: label {label!r} is not one of --labels {','.join(labels)}")
        if not body.strip():
            raise DataError(f"{path}:{line}: the text is empty")
        examples.append(Example(body, index[label]))
    if not examples:
        raise DataError(f"{path}: holds no examples")
    return examples


def _table_rows(path, text, delimiter, text_field, label_field):
    # QUOTE_NONE for .tsv: SMS texts hold stray double quotes that are part of the text
    quoting = csv.QUOTE_NONE if delimiter == "\t" else csv.QUOTE_MINIMAL
    rows = list(csv.reader(text.splitlines(), delimiter=delimiter, quoting=quoting))
    columns = (0, 1)
    start = 0
    if rows and label_field in rows[0] and text_field in rows[0]:
        columns, start = (rows[0].index(label_field), rows[0].index(text_field)), 1
    for number, row in enumerate(rows[start:], start + 1):
        if not row:
            continue
        if len(row) <= max(columns):
            raise DataError(f"{path}:{number}: expected a label and a text separated by "
                            f"{'a tab' if delimiter == chr(9) else 'a comma'}")
        label = row[columns[0]].strip()
        # a .tsv row whose text holds a tab: the rest of the row is the text
        body = delimiter.join(row[columns[1]:]) if delimiter == "\t" and columns == (0, 1) else row[columns[1]]
        yield number, label, body


def _jsonl_rows(path, text, text_field, label_field):
    for number, line in enumerate(text.splitlines(), 1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise DataError(f"{path}:{number}: not JSON ({err.msg})") from None
        if not isinstance(record, dict) or not isinstance(record.get(text_field), str) \
                or label_field not in record:
            raise DataError(f"{path}:{number}: expected an object with a string {text_field!r} and a {label_field!r}")
        yield number, str(record[label_field]).strip(), record[text_field]


def balance(examples: list[Example], seed: int) -> list[Example]:
    """Every class undersampled, at random, to the size of the smallest (the book's ham-to-spam)."""
    by_class: dict[int, list[Example]] = {}
    for e in examples:
        by_class.setdefault(e.label, []).append(e)
    smallest = min(len(v) for v in by_class.values())
    rng = random.Random(seed)
    return [e for label in sorted(by_class) for e in rng.sample(by_class[label], smallest)]


def split(examples: list[Example], fractions: tuple[float, float, float], seed: int) -> dict[str, list[Example]]:
    """Shuffled with `seed`, then cut as the book's ch. 6 does: int(n * train) for training,
    int(n * validation) next, the rest (1,494 balanced SMS: 1,045 / 149 / 300) for testing."""
    order = list(examples)
    random.Random(seed).shuffle(order)
    n_train, n_val = int(len(order) * fractions[0]), int(len(order) * fractions[1])
    train, val, test = order[:n_train], order[n_train:n_train + n_val], order[n_train + n_val:]
    if not train:
        raise DataError(f"{len(examples)} examples leave none for training")
    return {"train": train, "validation": val, "test": test}


def finetuning_splits(examples: list[Example], fractions: tuple[float, float, float], seed: int,
                      balanced: bool = False, limit: int | None = None) -> dict[str, list[Example]]:
    """The train, validation and test examples as `finetune classify` cuts them (balanced, then the
    first `limit` after a shuffle, then split), so `lmspec eval` can score exactly the same test."""
    if balanced:
        examples = balance(examples, seed)
    if limit:  # a quick run: the first N after a shuffle, so every class can appear
        examples = split(examples, (1.0, 0.0, 0.0), seed)["train"][:limit]
    return split(examples, fractions, seed)


def make_batch(token_lists: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """tokens [batch, longest] padded on the right with `pad_id`, and lengths [batch]."""
    longest = max(len(t) for t in token_lists)
    tokens = torch.full((len(token_lists), longest), pad_id, dtype=torch.long)
    for row, ids in enumerate(token_lists):
        tokens[row, :len(ids)] = torch.tensor(ids, dtype=torch.long)
    return tokens, torch.tensor([len(t) for t in token_lists], dtype=torch.long)
