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
from lmspec.dsl.errors import UserError

# kind -> "module:function" in lmspec.compiler, imported when a rewrite of that kind is applied
REWRITES = {
    "classify": "classify_head:classification_head",
    "lora": "lora:add_lora",
}


VOCAB_PADDING = "vocab_padding"  # a spec record's key for a vocabulary padded in training (compiler/vocab_padding.py)


class RewriteError(UserError, ValueError):
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


def spec_record(graph: ModelGraph, overrides: dict, rewrites: list[dict] | None = None,
                vocab_padding: dict | None = None) -> dict:
    """What a checkpoint keeps of its spec: enough to rebuild the same model with nothing else.
    `rewrites` are the compiler rewrites (compiler/rewrites.py) applied after building, in order;
    `vocab_padding` the real vocabulary of a run padded with --pad-vocab (compiler/vocab_padding.py)."""
    record = {"file": graph.file, "model": graph.name, "sources": graph.sources, "overrides": overrides}
    record |= {"rewrites": list(rewrites)} if rewrites else {}
    return record | ({VOCAB_PADDING: vocab_padding} if vocab_padding else {})
