"""Activation checkpointing per block, as a rewrite of the lowered torch.fx graph.

Each run of fx nodes that lowers one `repeat` iteration (`block.3`) becomes a segment: its own
GraphModule over the same submodules (so parameter names, and checkpoints, do not change),
called through `torch.utils.checkpoint`. During training the segment keeps only its inputs and
recomputes its inside in the backward pass; without gradients (evaluation, generation with the
KV cache) it runs as it is.
"""
from __future__ import annotations

import fnmatch
import operator

import torch
import torch.fx as fx
from torch.utils.checkpoint import checkpoint

BLOCK_META = "lmspec_block"  # fx node meta: the repeat iteration an op belongs to (set by lowering)


def block_names(model: fx.GraphModule) -> list[str]:
    """The repeat iterations of a lowered model, in order (`block.0`, `block.1`, …)."""
    seen: dict[str, None] = {}
    for node in model.graph.nodes:
        if node.meta.get(BLOCK_META):
            seen.setdefault(node.meta[BLOCK_META], None)
    return list(seen)


def select_blocks(model: fx.GraphModule, policy: str) -> list[str]:
    """The blocks a policy names: "all", or comma-separated names or glob patterns ("block.1?")."""
    names = block_names(model)
    if policy.strip() == "all":
        return names
    patterns = [p.strip() for p in policy.split(",") if p.strip()]
    chosen = [n for n in names if any(fnmatch.fnmatchcase(n, p) for p in patterns)]
    unmatched = [p for p in patterns if not any(fnmatch.fnmatchcase(n, p) for n in names)]
    if unmatched or not patterns:
        known = ", ".join(names[:4]) + (", …" if len(names) > 4 else "") if names else "none"
        raise ValueError(f"activation checkpointing: {', '.join(unmatched) or repr(policy)} names no block "
                         f"(the model's blocks: {known})")
    return chosen


def checkpoint_blocks(model: fx.GraphModule, policy: str = "all") -> list[str]:
    """Rewrite `model` in place so the blocks `policy` selects are checkpointed; returns their names."""
    chosen = set(select_blocks(model, policy))
    graph = model.graph
    runs: list[tuple[str, list[fx.Node]]] = []
    for node in graph.nodes:
        block = node.meta.get(BLOCK_META)
        if block not in chosen or node.op in ("placeholder", "output"):
            runs.append(("", []))  # a node outside any chosen block ends the run
            continue
        if runs and runs[-1][0] == block:
            runs[-1][1].append(node)
        else:
            runs.append((block, [node]))
    done = []
    for block, nodes in runs:
        if nodes:
            _extract(model, block, nodes)
            done.append(block)
    graph.lint()
    model.recompile()
    return done


def _extract(model: fx.GraphModule, block: str, nodes: list[fx.Node]) -> None:
    graph = model.graph
    inside = set(nodes)
    inputs: dict[fx.Node, None] = {}
    for node in nodes:
        for arg in node.all_input_nodes:
            if arg not in inside:
                inputs.setdefault(arg, None)
    outputs = [n for n in nodes if any(user not in inside for user in n.users)]

    sub = fx.Graph()
    env = {arg: sub.placeholder(arg.name) for arg in inputs}
    for node in nodes:
        env[node] = sub.node_copy(node, lambda a: env[a])
    sub.output(tuple(env[o] for o in outputs))
    segment = fx.GraphModule(model, sub, class_name=block.replace(".", "_"))  # shares the submodules

    with graph.inserting_before(nodes[0]):
        call = graph.call_function(_checkpointed(segment, block), tuple(inputs))
        results = [graph.call_function(operator.getitem, (call, i)) for i in range(len(outputs))]
    for out, result in zip(outputs, results):
        out.replace_all_uses_with(result)
    for node in reversed(nodes):
        graph.erase_node(node)


def _checkpointed(segment: fx.GraphModule, block: str):
    def run(*args):
        if torch.is_grad_enabled():
            return checkpoint(segment, *args, use_reentrant=False)
        return segment(*args)

    run.__name__ = "checkpointed_" + block.replace(".", "_")
    return run
