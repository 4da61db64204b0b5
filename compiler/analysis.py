"""What the graph tells before anything runs: parameter counts, FLOPs, and where they are."""
from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

from .graph import ModelGraph
from .registry import Op, get_op
from .shapes import Sym, concrete_shape


@dataclass
class FlopCall:
    """What an op's FLOP rule sees: its arguments and concrete shapes."""
    args: dict
    in_shapes: dict[str, tuple[int, ...]]
    out_shapes: list[tuple[int, ...]]
    params: dict[str, tuple[int, ...]]


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def parameter_count(graph: ModelGraph) -> int:
    """Parameters with their own storage: a tied weight counts once."""
    return sum(_numel(p.shape) for p in graph.owned_params())


def symbol_values(graph: ModelGraph, seq: int | None = None, batch: int = 1) -> dict[str, int]:
    """Concrete sizes for FLOP counts: each bounded dim at its bound (or `seq`), others `batch`."""
    values: dict[str, int] = {}
    for node_id in graph.inputs:
        for d in graph.g.nodes[node_id]["outputs"][0][0]:
            if isinstance(d, Sym):
                for f in d.factors:
                    if f in graph.bounds:
                        values[f] = seq if seq is not None else graph.bounds[f]
                    else:
                        values.setdefault(f, batch)
    return values


def node_flops(graph: ModelGraph, values: dict[str, int]) -> dict[str, int]:
    from .values import TensorRef
    out = {}
    for node_id, data in graph.nodes():
        op = get_op(data["op"])
        if type(op).flops is Op.flops:  # no matrix products
            continue
        in_shapes = {k: concrete_shape(v.shape, values) for k, v in data["args"].items() if isinstance(v, TensorRef)}
        outs = [concrete_shape(s, values) for s, _ in data["outputs"]]
        out[node_id] = op.flops(FlopCall(data["args"], in_shapes, outs, graph.node_params(node_id)))
    return out


def tokens_per_forward(graph: ModelGraph, values: dict[str, int]) -> int:
    """Tokens in one forward pass: the product of the first input's symbolic dims."""
    first = graph.g.nodes[graph.inputs[0]]["outputs"][0][0]
    return _numel(concrete_shape(first, values))


def flops_per_token(graph: ModelGraph, seq: int | None = None) -> float:
    """Forward FLOPs per token at sequence length `seq` (default: the context)."""
    values = symbol_values(graph, seq)
    return sum(node_flops(graph, values).values()) / tokens_per_forward(graph, values)


def residual_params(graph: ModelGraph) -> set[str]:
    """Weights that write into the residual stream (GPT-2 scales their init by 1/sqrt(count))."""
    found = set()
    for node_id, data in graph.nodes():
        op = get_op(data["op"])
        if op.residual:
            found.add(f"{data['module']}.{op.residual}")
        elif data["op"] == "linear" and _feeds_add(graph, node_id) and f"{data['module']}.weight" in graph.params:
            if graph.params[f"{data['module']}.weight"].tied_to is None:
                found.add(f"{data['module']}.weight")
    return found


def _feeds_add(graph: ModelGraph, node_id: str) -> bool:
    for succ in graph.g.successors(node_id):
        op = graph.g.nodes[succ]["op"]
        if op == "add" or (op == "dropout" and _feeds_add(graph, succ)):
            return True
    return False


@dataclass
class Group:
    name: str
    params: int
    flops: int
    count: int = 1


def breakdown(graph: ModelGraph, seq: int | None = None) -> list[Group]:
    """Parameters and forward FLOPs per top-level part (`wte`, `block.0`, …, `ln_f`), in model order;
    consecutive identical repeated blocks are folded into one row."""
    values = symbol_values(graph, seq)
    flops = node_flops(graph, values)
    groups: "OrderedDict[str, Group]" = OrderedDict()
    for node_id, data in graph.nodes():
        key = data["block"] or (data["module"] or "").split(".")[0] or None
        if key is None:
            continue
        g = groups.setdefault(key, Group(key, 0, 0))
        g.flops += flops.get(node_id, 0)
    for p in graph.owned_params():
        data = graph.g.nodes[p.node]
        key = data["block"] or data["module"].split(".")[0]
        groups[key].params += _numel(p.shape)
    folded: list[Group] = []
    for g in groups.values():
        prev = folded[-1] if folded else None
        if prev and _stem(prev.name) == _stem(g.name) and _stem(g.name) != g.name \
                and (prev.params, prev.flops) == (g.params, g.flops):
            prev.count += 1
            continue
        folded.append(Group(g.name, g.params, g.flops))
    return folded


def _stem(name: str) -> str:
    parts = name.split(".")
    return ".".join(parts[:-1]) if len(parts) > 1 and parts[-1].isdigit() else name
