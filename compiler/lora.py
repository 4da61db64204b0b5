"""LoRA as a rewrite of the model graph: low-rank adapters beside chosen weight matrices.

`add_lora` gives every matched matrix W [out, in] two new parameters, `<module>.lora_a` [rank, in]
and `<module>.lora_b` [out, rank], and notes on the op's node which of its matrices carry them
(node attribute "lora": matrix path inside the op's module -> (rank, scale alpha/rank)). Lowering reads the
note and builds a LoRALinear where the op builds its nn.Linear (compiler/lower.py), so the model
computes y = x W^T + b + scale * (x A^T) B^T; base parameter names do not change, so a base
checkpoint still loads. `merge_lora` folds the adapters into W and returns a plain graph again.

Which matrices an op applies as an nn.Linear is declared in the op registry (`Op.matrices`).
Nothing here imports torch at module level: adding adapters is a graph pass, checked without it.
"""
from __future__ import annotations

import dataclasses
import fnmatch

from .graph import ModelGraph, Param
from .registry import get_op
from .rewrites import RewriteError

NODE_ATTR = "lora"  # node attribute: {matrix path inside the op's module: (rank, scale)}
ADAPTER_SUFFIXES = (".lora_a", ".lora_b")


@dataclasses.dataclass(frozen=True)
class Matrix:
    path: str  # module path of the matrix: block.3.attn.qkv, lm_head
    local: str  # its path inside the op's module ("" when the op's module is the linear itself)
    node: str
    weight: Param


def weight_matrices(graph: ModelGraph) -> list[Matrix]:
    """Every matrix the model applies as a linear layer, in model order."""
    found = []
    for node_id, data in graph.nodes():
        op = get_op(data["op"])
        for local in getattr(op, "matrices", ()):
            path = f"{data['module']}.{local}" if local else data["module"]
            weight = graph.params.get(f"{path}.weight")
            if weight is not None and len(weight.shape) == 2:
                found.append(Matrix(path, local, node_id, weight))
    return found


def split_targets(targets: list[str] | str) -> list[str]:
    """Patterns from a list or a comma-separated string, blanks dropped."""
    items = targets.split(",") if isinstance(targets, str) else list(targets)
    if not all(isinstance(t, str) for t in items):
        raise RewriteError(f"lora: targets must be module patterns (strings), got {targets!r}")
    return [t.strip() for t in items if t.strip()]


def matches(path: str, pattern: str) -> bool:
    """A pattern matches the end of a module path at a dot ("attn.qkv" matches block.3.attn.qkv), or the
    whole path as a glob ("block.1?.attn.*")."""
    return fnmatch.fnmatchcase(path, pattern) or fnmatch.fnmatchcase(path, "*." + pattern)


def _check_options(rank, alpha) -> None:
    if isinstance(rank, bool) or not isinstance(rank, int) or rank < 1:
        raise RewriteError(f"lora: rank must be a positive integer, got {rank!r}")
    if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not alpha > 0:
        raise RewriteError(f"lora: alpha must be a positive number, got {alpha!r}")


def _unmatched_message(graph: ModelGraph, pattern: str, matrices: list[Matrix]) -> str:
    stacked = [name for name, p in graph.params.items() if len(p.shape) == 3 and matches(name, pattern)]
    if stacked:
        return (f"lora: target {pattern!r} names only stacked expert weights ({stacked[0]}, …), which cannot "
                f"take adapters; target the router or the attention instead")
    # one path per kind of matrix (block.0.attn.qkv stands for every block's), so the list stays short
    kinds = {_generic(m.path): m.path for m in reversed(matrices)}
    paths = list(reversed(kinds.values()))
    listed = ", ".join(paths[:8]) + (", …" if len(paths) > 8 else "")
    return f"lora: target {pattern!r} matches no weight matrix (the model has {listed})"


def _generic(path: str) -> str:
    return ".".join("N" if part.isdigit() else part for part in path.split("."))


def add_lora(graph: ModelGraph, rank: int, alpha: float, targets: list[str] | str) -> ModelGraph:
    """A copy of `graph` with rank-`rank` adapters beside every weight matrix a target pattern matches,
    scaled by alpha / rank. Raises RewriteError for a pattern that matches nothing, a bad rank or
    alpha, a tied matrix, or a graph that already has adapters."""
    _check_options(rank, alpha)
    patterns = split_targets(targets)
    if not patterns:
        raise RewriteError("lora: no target patterns given")
    if is_lora(graph):
        raise RewriteError("lora: the model already has LoRA adapters; merge them first (lmspec lora merge)")
    matrices = weight_matrices(graph)
    for pattern in patterns:
        if not any(matches(m.path, pattern) for m in matrices):
            raise RewriteError(_unmatched_message(graph, pattern, matrices))
    chosen = [m for m in matrices if any(matches(m.path, p) for p in patterns)]
    for m in chosen:
        if rank > min(m.weight.shape):  # no longer low-rank: more parameters than the matrix, no more reach
            raise RewriteError(f"lora: rank {rank} is more than {m.path}.weight's smaller side "
                               f"{min(m.weight.shape)} {list(m.weight.shape)}; give a rank of at most that")
        if m.weight.tied_to is not None:
            # Folding an update into a shared matrix would change the other user (the embedding) too.
            raise RewriteError(f"lora: {m.path}.weight is tied to {m.weight.tied_to}; tied matrices cannot "
                               f"take adapters (leave {m.path} out of the targets)")

    out = dataclasses.replace(graph, g=graph.g.copy(), params={})
    adapted = {m.weight.name: m for m in chosen}
    for name, param in graph.params.items():
        out.params[name] = param
        m = adapted.get(name)
        if m is not None:  # adapters listed right after the matrix they adapt
            rows, cols = m.weight.shape
            out.params[f"{m.path}.lora_a"] = Param(f"{m.path}.lora_a", (rank, cols), m.node)
            out.params[f"{m.path}.lora_b"] = Param(f"{m.path}.lora_b", (rows, rank), m.node)
    for m in chosen:
        data = out.g.nodes[m.node]
        data[NODE_ATTR] = {**data.get(NODE_ATTR, {}), m.local: (rank, alpha / rank)}
    return out


def is_lora(graph: ModelGraph) -> bool:
    return any(NODE_ATTR in data for _, data in graph.nodes())


def lora_parameter_names(graph: ModelGraph) -> list[str]:
    """The adapter parameters (`….lora_a`, `….lora_b`), in model order."""
    return [name for name in graph.params if name.endswith(ADAPTER_SUFFIXES)]


def adapted_matrices(graph: ModelGraph) -> list[tuple[str, float]]:
    """(module path, scale) of every matrix that carries adapters."""
    found = []
    for _, data in graph.nodes():
        for local, (_, scale) in data.get(NODE_ATTR, {}).items():
            found.append((f"{data['module']}.{local}" if local else data["module"], scale))
    return found


def without_lora(graph: ModelGraph) -> ModelGraph:
    """A copy of `graph` with its adapters removed (every other rewrite kept)."""
    out = dataclasses.replace(graph, g=graph.g.copy(),
                              params={n: p for n, p in graph.params.items() if not n.endswith(ADAPTER_SUFFIXES)})
    for _, data in out.g.nodes(data=True):
        data.pop(NODE_ATTR, None)
    return out


def merge_lora(graph: ModelGraph, weights: dict) -> tuple[ModelGraph, dict]:
    """Fold the adapters into their matrices, W' = W + scale * B A (computed in float32, stored in W's
    dtype): the graph without LoRA and its weights without adapter tensors. `weights` is not changed."""
    if not is_lora(graph):
        raise RewriteError("lora: the model has no LoRA adapters to merge")
    merged = {name: t for name, t in weights.items() if not name.endswith(ADAPTER_SUFFIXES)}
    for path, scale in adapted_matrices(graph):
        names = [f"{path}.weight", f"{path}.lora_a", f"{path}.lora_b"]
        missing = [n for n in names if n not in weights]
        if missing:
            raise RewriteError(f"lora: cannot merge {path}: no weights for {', '.join(missing)}")
        w, a, b = (weights[n] for n in names)
        merged[names[0]] = (w.float() + scale * (b.float() @ a.float())).to(w.dtype)
    return without_lora(graph), merged


def rewrites_without_lora(rewrites: list[dict]) -> list[dict]:
    """A spec record's rewrites less the LoRA one: what a merged checkpoint's record keeps."""
    return [r for r in rewrites if not (isinstance(r, dict) and r.get("kind") == "lora")]


def adapter_fills(graph: ModelGraph, seed: int):
    """(name, shape, fill) of the adapters' initial values, in model order (compiler/lower.py's
    initial_fills): A ~ kaiming-uniform (bound 1/sqrt(in), as nn.Linear and PEFT do), B = 0, so a
    fresh adapted model computes exactly what its base does. A generator of their own keeps the base
    weights' draws the same with or without adapters."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    for name in lora_parameter_names(graph):
        shape = graph.params[name].shape
        if name.endswith(".lora_b"):
            yield name, shape, torch.Tensor.zero_
        else:
            bound = shape[1] ** -0.5
            yield name, shape, lambda t, bound=bound: t.uniform_(-bound, bound, generator=gen)
