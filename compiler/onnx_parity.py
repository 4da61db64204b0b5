"""Does an exported ONNX model compute what the PyTorch model computes?

The check every export ends with: a random prompt through onnxruntime with an empty cache, then a
few more tokens with the cache that call returned, each compared with the PyTorch model run over the
whole sequence without any cache. So the comparison covers the export and the cache layout at once.
Where the export takes `logits_to_keep`, the prompt also runs asking for its last logits only.

A classifier's check runs right-padded batches of texts of different lengths (the padding random
ids) through both, and compares the class logits and the predicted classes.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

from .onnx_export import CacheLayout
from .onnx_last_logits import LOGITS_TO_KEEP


@dataclass
class Parity:
    empty_cache: float  # max |ONNX - PyTorch| over the prompt's logits (and its last ones alone)
    filled_cache: float | None  # ... over the logits of tokens fed after it; None without a cache

    @property
    def worst(self) -> float:
        return max(self.empty_cache, self.filled_cache or 0.0)

    def describe(self) -> str:
        text = f"max |logits difference|: {self.empty_cache:.2e} with an empty cache"
        if self.filled_cache is not None:
            text += f", {self.filled_cache:.2e} with a filled one"
        return text

    def as_dict(self) -> dict:
        return {"empty_cache": self.empty_cache, "filled_cache": self.filled_cache}


@dataclass
class ClassifierParity:
    logits: float  # max |ONNX - PyTorch| over the class logits of every text
    same_class: int  # texts for which both predict the same class
    texts: int
    lengths: tuple[int, int]  # the shortest and longest text

    @property
    def worst(self) -> float:
        return self.logits

    def describe(self) -> str:
        return (f"max |logits difference|: {self.logits:.2e} over {self.texts} right-padded texts of "
                f"{self.lengths[0]} to {self.lengths[1]} tokens; the same class for {self.same_class} of {self.texts}")

    def as_dict(self) -> dict:
        return {"logits": self.logits, "same_class": self.same_class, "texts": self.texts}


def check_parity(model: nn.Module, session, layout: CacheLayout | None, vocab_size: int, context: int | None,
                 seed: int = 0, batch: int = 2) -> Parity:
    """Compare `session` (an onnxruntime InferenceSession of the export) with `model`."""
    context = context or 64
    prompt_len = max(1, min(16, context - 4))
    extra = min(4, context - prompt_len) if layout is not None else 0
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, prompt_len + extra), generator=gen)
    model = model.eval()
    with torch.no_grad():
        reference = _logits_of(model(ids)).float().numpy()
    if layout is None:
        feeds = {"input_ids": ids.numpy()}
        logits = session.run(["logits"], feeds)[0]
        return Parity(max(_max_diff(logits, reference), _last_logits_diff(session, feeds, 1, reference)), None)

    if layout.shared_buffer:
        return _shared_buffer_parity(model, session, layout, ids, prompt_len, extra)
    prompt = ids[:, :prompt_len].numpy()
    float_type = _float_type(session)
    empty = {name: np.zeros((batch, layout.kv_heads[i // 2], 0, layout.head_dim[i // 2]), dtype=float_type)
             for i, name in enumerate(layout.input_names())}
    first = session.run(None, _feeds(prompt, 0, empty))
    parity_empty = max(_max_diff(first[0], reference[:, :prompt_len]),
                       _last_logits_diff(session, _feeds(prompt, 0, empty), 1, reference[:, :prompt_len]))
    if extra == 0:
        return Parity(parity_empty, None)
    past = dict(zip(layout.input_names(), first[1:]))
    second = session.run(None, _feeds(ids[:, prompt_len:].numpy(), prompt_len, past))
    return Parity(parity_empty, _max_diff(second[0], reference[:, prompt_len:]))


def _shared_buffer_parity(model: nn.Module, session, layout: CacheLayout, ids: torch.Tensor, prompt_len: int,
                          extra: int) -> Parity:
    """The check for a fused-attention export: rows of different lengths in one buffer (the prompt
    right-padded, then one token per call, each row at its own position), each compared with the
    PyTorch model run over that row alone."""
    batch = ids.shape[0]
    lengths = [prompt_len - min(i, prompt_len - 1) % 3 for i in range(batch)]  # row i is i % 3 shorter
    rows = [ids[i, :lengths[i] + extra] for i in range(batch)]
    with torch.no_grad():
        references = [_logits_of(model(row[None]))[0].float().numpy() for row in rows]
    capacity = prompt_len + extra
    float_type = _float_type(session)
    past = {name: np.zeros((batch, layout.kv_heads[i // 2], capacity, layout.head_dim[i // 2]), dtype=float_type)
            for i, name in enumerate(layout.input_names())}
    prompt = np.zeros((batch, prompt_len), dtype=np.int64)
    for i, row in enumerate(rows):
        prompt[i, :lengths[i]] = row[:lengths[i]].numpy()
    mask = (np.arange(prompt_len)[None] < np.array(lengths)[:, None]).astype(np.int64)
    positions = np.broadcast_to(np.arange(prompt_len), (batch, prompt_len)).copy()
    feeds = {"input_ids": prompt, "attention_mask": mask, "position_ids": positions}
    # the columns that hold every row's last token; run on buffers of its own, as the run below fills `past`
    keep = prompt_len - min(lengths) + 1
    kept = _kept_logits(session, {**feeds, **{k: v.copy() for k, v in past.items()}}, keep)
    start = prompt_len - keep  # row i's kept columns are prompt positions start .. lengths[i] - 1
    kept_diff = 0.0 if kept is None else float("inf") if kept.shape[1] != keep else max(
        _max_diff(kept[i, :n - start], references[i][start:n]) for i, n in enumerate(lengths))
    out = session.run(None, {**feeds, **past})
    parity_empty = max(kept_diff, *(_max_diff(out[0][i, :n], references[i][:n]) for i, n in enumerate(lengths)))
    if extra == 0:
        return Parity(parity_empty, None)
    filled = 0.0
    for step in range(extra):  # onnxruntime's kernel takes one token per row once a batch has a past
        past = dict(zip(layout.input_names(), out[1:]))
        now = [n + step for n in lengths]
        column = np.array([[row[n].item()] for row, n in zip(rows, now)], dtype=np.int64)
        mask = (np.arange(max(now) + 1)[None] < np.array(now)[:, None] + 1).astype(np.int64)
        out = session.run(None, {"input_ids": column, "attention_mask": mask,
                                 "position_ids": np.array(now, dtype=np.int64)[:, None], **past})
        filled = max(filled, *(_max_diff(out[0][i, 0], references[i][n]) for i, n in enumerate(now)))
    return Parity(parity_empty, filled)


def _logits_of(out):
    return out[0] if isinstance(out, tuple) else out


def check_classifier_parity(model: nn.Module, session, vocab_size: int, context: int | None,
                            seed: int = 0) -> ClassifierParity:
    """Compare `session` (an onnxruntime InferenceSession of an exported classifier) with `model`."""
    gen = torch.Generator().manual_seed(seed)
    model = model.eval()
    diffs, same, lengths = [], 0, []
    for tokens, rows in _padded_batches(context or 64, vocab_size, gen):
        with torch.no_grad():
            reference = model(tokens, rows).float().numpy()
        logits = session.run(["logits"], {"input_ids": tokens.numpy(), "lengths": rows.numpy()})[0]
        diffs.append(_max_diff(logits, reference))
        same += int((logits.argmax(-1) == reference.argmax(-1)).sum())
        lengths += rows.tolist()
    return ClassifierParity(max(diffs), same, len(lengths), (min(lengths), max(lengths)))


def _padded_batches(context: int, vocab_size: int, gen: torch.Generator):
    """(tokens, lengths) of two batches of different widths, each with a full-width row, a row of one
    token and two in between; random ids in the padding too, which must not change any logit."""
    for width in sorted({min(16, context), min(5, context)}, reverse=True):
        lengths = torch.cat([torch.tensor([width, 1]), torch.randint(1, width + 1, (2,), generator=gen)])
        yield torch.randint(0, vocab_size, (len(lengths), width), generator=gen), lengths


def _feeds(ids: np.ndarray, past_len: int, past: dict) -> dict:
    batch, seq = ids.shape
    return {
        "input_ids": ids.astype(np.int64),
        "attention_mask": np.ones((batch, past_len + seq), dtype=np.int64),
        "position_ids": np.broadcast_to(np.arange(past_len, past_len + seq, dtype=np.int64), (batch, seq)).copy(),
        **past,
    }


def _float_type(session):
    kind = next(i.type for i in session.get_inputs() if i.name.startswith("past_key_values."))
    return np.float16 if "float16" in kind else np.float32


def _last_logits_diff(session, feeds: dict, keep: int, reference: np.ndarray) -> float:
    """max |ONNX - PyTorch| over the logits of the last `keep` positions asked for with
    logits_to_keep (0.0 where the export does not take it)."""
    kept = _kept_logits(session, feeds, keep)
    if kept is None:
        return 0.0
    return _max_diff(kept, reference[:, -keep:]) if kept.shape[1] == keep else float("inf")


def _kept_logits(session, feeds: dict, keep: int) -> np.ndarray | None:
    """The logits of the last `keep` positions, asked for with logits_to_keep; None where the export
    does not take it."""
    if LOGITS_TO_KEEP not in {i.name for i in session.get_overridable_initializers()}:
        return None
    return session.run(["logits"], {**feeds, LOGITS_TO_KEEP: np.array(keep, dtype=np.int64)})[0]


def _max_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.float64) - b.astype(np.float64)).max())
