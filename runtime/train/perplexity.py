"""A language model's cross-entropy on a token stream, for `lmspec eval`.

The stream is cut into non-overlapping windows of `seq` inputs: window k reads tokens
[k*seq, (k+1)*seq] and predicts tokens k*seq+1 … (k+1)*seq from the ones before them in the window,
so every token but the first is scored exactly once; the last window may be shorter. Each window
starts with no earlier context (the usual non-overlapping perplexity, as nanoGPT and the book
compute it; a sliding window would give a lower number at many times the cost).

A stream may come in pieces (the shard files of one split, a document running on from one shard
into the next): windows run across the pieces as if they were one array, and only the window being
filled is copied out of them, so memory-mapped shards are never read whole.
"""
from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from lmspec.runtime.distributed.device import to_device


_READ_EVERY = 64  # batches whose sums wait on the device before one read


@dataclass
class LossTotal:
    """Summed cross-entropy (nats) over `tokens` scored tokens in `windows` windows."""
    total: float = 0.0
    tokens: int = 0
    windows: int = 0

    @property
    def mean(self) -> float:
        return self.total / self.tokens if self.tokens else math.nan

    @property
    def perplexity(self) -> float:
        return math.exp(self.mean) if self.tokens else math.nan


def stream_windows(pieces: Iterable[Sequence[int]], seq: int) -> Iterator[np.ndarray]:
    """Windows of up to seq + 1 tokens (inputs and, shifted by one, targets) over the pieces joined;
    consecutive windows share one token, the last target of one being the first input of the next."""
    window = np.empty(seq + 1, dtype=np.int64)
    filled = 0
    for piece in pieces:
        pos, n = 0, len(piece)
        while pos < n:
            take = min(seq + 1 - filled, n - pos)
            window[filled:filled + take] = np.asarray(piece[pos:pos + take])
            filled += take
            pos += take
            if filled == seq + 1:
                yield window.copy()
                window[0] = window[seq]
                filled = 1
    if filled > 1:
        yield window[:filled].copy()


def batched_windows(streams: Iterable[Iterable[Sequence[int]]], seq: int, batch: int,
                    max_tokens: int | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """(inputs, targets) batches of `batch` windows of equal length over each stream in turn (a
    window never crosses from one stream into the next); at most `max_tokens` targets in all."""
    left = max_tokens if max_tokens is not None else math.inf
    rows: list[np.ndarray] = []
    for pieces in streams:
        for window in stream_windows(pieces, seq):
            if left <= 0:
                break
            window = window[:int(min(len(window), left + 1))]
            left -= len(window) - 1
            if rows and len(rows[0]) != len(window):  # a shorter last window goes in a batch of its own
                yield _as_batch(rows)
                rows = []
            rows.append(window)
            if len(rows) == batch:
                yield _as_batch(rows)
                rows = []
    if rows:
        yield _as_batch(rows)


def _as_batch(rows: list[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
    both = torch.from_numpy(np.stack(rows))
    return both[:, :-1], both[:, 1:]


def score_batches(model: torch.nn.Module, batches: Iterable[tuple[torch.Tensor, torch.Tensor]]) -> LossTotal:
    """The summed next-token cross-entropy of `model` (logits [batch, seq, vocab]) over the batches,
    in eval mode, without gradients; sums in float64, so a long text loses no precision."""
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    result = LossTotal()
    pending = []  # batch sums still on the device: read every _READ_EVERY batches, not after each one

    def read_pending():
        for batch_sum in torch.stack(pending).tolist() if pending else []:
            result.total += batch_sum  # in batch order, as one read per batch added them
        pending.clear()

    try:
        with torch.no_grad():
            for x, y in batches:
                logits = model(to_device(x, device))
                loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), to_device(y.reshape(-1), device),
                                       reduction="sum")
                pending.append(loss.double())
                result.tokens += y.numel()
                result.windows += len(y)
                if len(pending) == _READ_EVERY:
                    read_pending()
        read_pending()
    finally:
        model.train(was_training)
    return result
