"""Rewrites of a built ModelGraph: passes that change the model a spec describes after it is built
(a classification head in place of the LM head, LoRA adapters beside chosen matrices).

A rewrite is recorded as a plain dict, `{"kind": "lora", "rank": 8, ...}`, in the spec record a
checkpoint keeps (runtime/cli/train.py: spec_record), so the same model is rebuilt from the
checkpoint alone: the spec's sources, its overrides, then its rewrites in order. Each kind's pass
lives in its own module and takes the graph plus the record's other keys as keyword arguments.
"""
from __future__ import annotations

import importlib

from .graph import ModelGraph

# kind -> "module:function" in lmspec.compiler, imported when a rewrite of that kind is applied
REWRITES = {
    "classify": "classify_head:classification_head",
    "lora": "lora:add_lora",
}


class RewriteError(ValueError):
    """A rewrite that cannot apply to this graph; the message names the rewrite and the reason."""


def apply_rewrites(graph: ModelGraph, rewrites: list[dict]) -> ModelGraph:
    """The graph with each recorded rewrite applied in order."""
    for record in rewrites:
        if not isinstance(record, dict) or record.get("kind") not in REWRITES:
            kind = record.get("kind") if isinstance(record, dict) else record
            raise RewriteError(f"unknown rewrite {kind!r} (known: {', '.join(REWRITES)})")
        module, function = REWRITES[record["kind"]].split(":")
        rewrite = getattr(importlib.import_module(f"lmspec.compiler.{module}"), function)
        options = {k: v for k, v in record.items() if k != "kind"}
        graph = rewrite(graph, **options)
    return graph


def graph_from_record(spec: dict) -> ModelGraph:
    """The model a checkpoint's spec record describes: its sources built with its overrides, then
    its rewrites. Needs nothing but the record (no files, no torch)."""
    from .loader import load_spec
    graph = load_spec(spec["file"], spec["overrides"], spec["model"], sources=spec["sources"])
    return apply_rewrites(graph, spec["rewrites"]) if spec.get("rewrites") else graph
