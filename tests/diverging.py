"""A model that goes bad on cue, for the tests of how every training loop stops a run that diverges."""
from __future__ import annotations

import torch


class GoesBad(torch.nn.Module):
    """Wraps `model`; from its `after`+1-th training forward on, its logits turn NaN (part "loss"), its
    gradients do while the loss stays finite ("gradient"), or only its evaluation logits do
    ("validation"). Takes the wrapped model's arguments and, where it has one, its context."""

    PARTS = ("loss", "gradient", "validation")

    def __init__(self, model: torch.nn.Module, after: int, part: str = "loss"):
        super().__init__()
        assert part in self.PARTS, part
        self.model, self.after, self.part, self.calls = model, after, part, 0
        if hasattr(model, "context"):
            self.context = model.context

    def forward(self, *args):
        self.calls += self.training
        logits = self.model(*args)
        if self.calls <= self.after:
            return logits
        if self.part == "gradient" and self.training:
            logits.register_hook(lambda grad: grad * float("nan"))
        if self.part == "loss" or (self.part == "validation" and not self.training):
            return logits * float("nan")
        return logits
