"""A token stream split into training and validation parts, served as (input, target) windows."""
from __future__ import annotations

import torch

from lmspec.runtime.data.corpus import DataError


class TokenData:
    """The first (1 - val_fraction) of the tokens train, the rest validate (nanoGPT's split).

    Under torchrun every rank draws the windows of the whole global batch (batch * world_size) and
    keeps its own slice, as token shards do (runtime/data/shards.py): N ranks train on the same windows
    as one process with N times the batch, and their generators stay in step."""

    def __init__(self, ids: torch.Tensor, val_fraction: float = 0.1, rank: int = 0, world_size: int = 1):
        ids = torch.as_tensor(ids, dtype=torch.long)
        if ids.dim() != 1:
            raise DataError(f"token ids must be one-dimensional, got shape {list(ids.shape)}")
        if not 0.0 <= val_fraction < 1.0:
            raise DataError(f"val_fraction must be in [0, 1), got {val_fraction}")
        split = int(len(ids) * (1.0 - val_fraction))
        self.train = ids[:split]
        self.val = ids[split:]
        self.rank, self.world_size = rank, world_size

    def __len__(self) -> int:
        return len(self.train) + len(self.val)

    def check_seq(self, seq: int, validation: bool = True) -> None:
        """Fail early, before training starts, when a window of `seq` tokens does not fit."""
        _check_fits(self.train, seq, "training")
        if validation:
            _check_fits(self.val, seq, "validation")

    def train_batch(self, batch: int, seq: int, generator: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
        """This rank's `batch` random windows of the training split; y is x shifted left by one token."""
        _check_fits(self.train, seq, "training")
        starts = torch.randint(len(self.train) - seq, (batch * self.world_size,), generator=generator)
        return _windows(self.train, starts[self.rank * batch:(self.rank + 1) * batch], seq)

    def val_batches(self, batch: int, seq: int, n_batches: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
        """The same validation windows every call: evenly spaced over the split, so val losses compare
        across steps and runs, and no random generator is touched."""
        _check_fits(self.val, seq, "validation")
        n_batches = batches_to_cover(n_batches, batch, len(self.val) - seq)
        count = batch * n_batches
        starts = torch.linspace(0, len(self.val) - seq - 1, count).round().long()
        return [_windows(self.val, starts[i * batch:(i + 1) * batch], seq) for i in range(n_batches)]


def batches_to_cover(n_batches: int, batch: int, windows: int) -> int:
    """At most `n_batches` validation batches, and no more than it takes to see each of the split's
    distinct `windows` once: beyond that they would only repeat windows (and --eval-batches 1e12
    would exhaust memory listing them)."""
    return min(n_batches, -(-windows // batch))


def _check_fits(ids: torch.Tensor, seq: int, part: str) -> None:
    if seq < 1:
        raise DataError(f"sequence length must be positive, got {seq}")
    if len(ids) < seq + 1:
        raise DataError(
            f"the {part} split has {len(ids)} tokens, fewer than sequence length + 1 = {seq + 1}; "
            f"use more data or a shorter --seq"
        )


def _windows(ids: torch.Tensor, starts: torch.Tensor, seq: int) -> tuple[torch.Tensor, torch.Tensor]:
    x = torch.stack([ids[i:i + seq] for i in starts.tolist()])
    y = torch.stack([ids[i + 1:i + 1 + seq] for i in starts.tolist()])
    return x, y
