"""The learning-rate schedules: linear warm-up, then cosine decay (nanoGPT's get_lr), warm-up-stable-decay,
linear decay, or a constant rate, each a function of the step alone (so a resumed run goes on the same)."""
from __future__ import annotations

import math

SCHEDULES = ("cosine", "wsd", "linear", "constant")
DECAY_FRACTION = 0.2  # wsd: the share of the run spent decaying (MiniCPM's and others' 10-20%)


def learning_rate(step: int, *, max_lr: float, min_lr: float, warmup: int, decay_steps: int,
                  schedule: str = "cosine", decay_fraction: float = DECAY_FRACTION) -> float:
    """The rate for 0-based optimizer step `step`: it rises linearly over `warmup` steps, then
    - cosine: follows a half cosine from max_lr down to min_lr at `decay_steps`;
    - wsd: stays at max_lr, then falls linearly to min_lr over the last `decay_fraction` of `decay_steps`;
    - linear: falls linearly from max_lr to min_lr at `decay_steps`;
    - constant: stays at max_lr;
    and stays at min_lr after `decay_steps` (constant: at max_lr)."""
    if step < warmup:
        return max_lr * (step + 1) / (warmup + 1)
    if schedule == "constant":
        return max_lr
    if step >= decay_steps:
        return min_lr
    if schedule == "wsd":
        start = max(warmup, decay_steps - math.ceil(decay_fraction * decay_steps))
        if step < start:
            return max_lr
        return max_lr - (max_lr - min_lr) * (step - start) / (decay_steps - start)
    ratio = (step - warmup) / (decay_steps - warmup)
    if schedule == "linear":
        return max_lr - (max_lr - min_lr) * ratio
    if schedule != "cosine":
        raise ValueError(f"unknown learning-rate schedule {schedule!r}; known: {', '.join(SCHEDULES)}")
    coeff = 0.5 * (1.0 + math.cos(math.pi * ratio))  # 1 -> 0
    return min_lr + coeff * (max_lr - min_lr)
