"""The learning-rate schedule: linear warm-up, then cosine decay to a floor (nanoGPT's get_lr)."""
from __future__ import annotations

import math


def learning_rate(step: int, *, max_lr: float, min_lr: float, warmup: int, decay_steps: int) -> float:
    """The rate for 0-based optimizer step `step`: rises linearly over `warmup` steps, then follows a
    half cosine from max_lr down to min_lr at `decay_steps`, and stays at min_lr after."""
    if step < warmup:
        return max_lr * (step + 1) / (warmup + 1)
    if step >= decay_steps:
        return min_lr
    ratio = (step - warmup) / (decay_steps - warmup)
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)
