"""Whether a sequence length fits a model's context, in the one message every verb gives (train, eval,
plan, info, diff); no torch, so that the verbs that never import it can use it."""
from __future__ import annotations

from lmspec.runtime.errors import UsageError


def check_seq_fits(seq: int | None, graph) -> None:
    """--seq against the model's context (a model without one takes any length)."""
    if seq is not None and graph.context is not None and seq > graph.context:
        raise UsageError(f"--seq {seq} is longer than the model's context {graph.context}"
                         + (f" ({graph.name})" if graph.name else ""))
