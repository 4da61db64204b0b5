"""Tensor parallelism (Megatron-style) derived from the model graph: how each parameter is split.

A pure pass over a ModelGraph (no torch): for every parameter, whether it is split across the `tp`
ranks of a tensor-parallel group, along which dim, and how a fused tensor's sections are dealt out.

  attention   qkv (rows [q heads | k heads | v heads])  column-parallel by heads: each rank holds
              its heads/tp query heads and kv_heads/tp key/value heads, bias likewise;
              proj row-parallel (its input dim, heads * head_dim, split by heads), proj bias replicated
              (added once, after the all-reduce); q_norm/k_norm replicated (applied per head)
  mlp         fc column-parallel (a gated one holds [gate | up]: each section split, so each rank has
              its gate and its up rows), proj row-parallel, proj bias replicated
  embedding   vocab-parallel: rows split
  linear      an output head over the vocabulary (out equal to an embedding's rows, or tied to one)
              vocab-parallel: rows (output features) split; a tied head shares the embedding's split
  the rest    replicated, with the reason: norms, position tables, a plain linear in a hand-written
              block, MoE experts

Heads, kv_heads, the MLP's hidden size and the vocabulary must divide by `tp`; otherwise the plan
refuses with a located SpecError (E103) before any process group exists (no padding).

`fused_row_order` gives the permutation the runtime applies to a fused tensor's rows before
sharding it contiguously (see runtime/distributed/tensor_parallel.py).
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field

from lmspec.dsl.diagnostics import Diagnostic, SpecError

from .graph import ModelGraph

COLUMN, ROW, VOCAB, REPLICATE = "column", "row", "vocab", "replicated"

# How the runtime treats an op module as a whole
ATTENTION, MLP, EMBEDDING, HEAD, REPLICATED = "attention", "mlp", "embedding", "head", "replicated"


@dataclass(frozen=True)
class ParamSplit:
    name: str
    shape: tuple[int, ...]
    split: str  # column | row | vocab | replicated
    dim: int | None  # the tensor dim that is split (None: replicated)
    local_shape: tuple[int, ...]
    sections: tuple[int, ...] = ()  # sizes of a fused tensor's parts along `dim` ([q|k|v], [gate|up]), each split
    how: str = ""  # for people: "column by heads", "row", "vocab", "replicated"
    reason: str = ""  # why a parameter is replicated
    tied_to: str | None = None

    @property
    def sharded(self) -> bool:
        return self.dim is not None


@dataclass(frozen=True)
class ModuleRule:
    module: str  # the op module's path: block.3.attn
    op: str
    kind: str  # attention | mlp | embedding | head | replicated
    heads: int | None = None  # attention: the heads (and kv heads) of one rank
    kv_heads: int | None = None
    tied_to: str | None = None  # head: the parameter its weight shares storage with


@dataclass
class TensorParallelPlan:
    tp: int
    params: dict[str, ParamSplit] = field(default_factory=dict)  # in the graph's order
    modules: dict[str, ModuleRule] = field(default_factory=dict)
    # Megatron's sequence parallelism: between attention and MLP the residual stream (and the norms,
    # position table and anything else replicated that runs on it) is split along the sequence
    sequence_parallel: bool = False

    @property
    def total_parameters(self) -> int:
        return sum(_numel(p.shape) for p in self.params.values() if p.tied_to is None)

    @property
    def per_rank_parameters(self) -> int:
        return sum(_numel(p.local_shape) for p in self.params.values() if p.tied_to is None)

    def rows(self) -> list[tuple[str, str, str, str, str]]:
        """(parameter, shape, split, per-rank shape, note) per parameter, repeated layers folded
        (`block.{0-11}.attn.qkv.weight`)."""
        return _fold([(p.name, _fmt(p.shape), p.how, _fmt(p.local_shape), p.reason) for p in self.params.values()])

    def describe(self) -> str:
        return format_tensor_parallel_plan(self)


# Ops that mix positions, so cannot run on a rank's slice of the sequence: hand-written attention
# (scores, softmax over keys, the mask) and reshapes that may move the sequence dim
CROSS_POSITION_OPS = ("matmul", "softmax", "causal_mask", "transpose", "reshape", "split", "last_token")


def tensor_parallel_plan(graph: ModelGraph, tp: int, sequence_parallel: bool = False) -> TensorParallelPlan:
    """The split of every parameter of `graph` over `tp` ranks; SpecError (E103, located at the op)
    where heads, kv heads, an MLP's hidden size or the vocabulary do not divide by tp, or, with
    `sequence_parallel`, where an op outside attention mixes positions."""
    if not isinstance(tp, int) or tp < 1:
        raise ValueError(f"tp must be a positive int, got {tp!r}")
    plan = TensorParallelPlan(tp, sequence_parallel=sequence_parallel)
    by_node: dict[str, list] = {}
    for p in graph.params.values():
        by_node.setdefault(p.node, []).append(p)
    vocab_sizes = {d["args"].get("num") for _, d in graph.nodes() if d["op"] == "embedding"}
    outputs = {ref.node for _, ref in graph.outputs}
    errors: list[Diagnostic] = []

    def refuse(data: dict, message: str) -> None:
        diagnostic = Diagnostic(f"{data['op']}: {message}", data.get("span"), code="E103")
        # a repeated block reports once, at its source line, not once per layer
        if not any((d.message, d.span) == (diagnostic.message, diagnostic.span) for d in errors):
            errors.append(diagnostic)

    mixing = next((d for _, d in graph.nodes() if d["op"] in CROSS_POSITION_OPS), None) if sequence_parallel else None
    if mixing is not None:  # the first is enough to say why
        refuse(mixing, "mixes positions, so it cannot run on a slice of the sequence: sequence parallelism "
                       "needs every op outside attention and the MLP to act on each position alone")
    for node_id, data in graph.nodes():
        params = by_node.get(node_id)
        if not params:
            continue
        module, op, args = data["module"], data["op"], data["args"]
        local = {p.name[len(module) + 1:]: p for p in params}
        rule, splits = _rule(op, module, args, local, tp, vocab_sizes, node_id in outputs, graph, refuse, data)
        plan.modules[module] = rule
        for p in params:
            plan.params[p.name] = splits[p.name]
    if errors:
        raise SpecError(errors, graph.sources)
    # A tied parameter follows its owner's split (the owner's rule decided it; check they agree).
    for name, split in plan.params.items():
        if split.tied_to and split.tied_to in plan.params:
            owner = plan.params[split.tied_to]
            if (owner.dim, owner.sections) != (split.dim, split.sections):
                raise AssertionError(f"{name} is tied to {owner.name} but split differently")
    return plan


_EXPECTED = {
    "attention": {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias", "q_norm.weight", "k_norm.weight"},
    "mlp": {"fc.weight", "fc.bias", "proj.weight", "proj.bias"},
    "embedding": {"weight"},
    "linear": {"weight", "bias"},
}
_REASONS = {
    "layernorm": "norm: acts on the replicated residual stream",
    "rmsnorm": "norm: acts on the replicated residual stream",
    "position": "position table: added to the replicated residual stream",
    "moe": "MoE experts are not split (no expert parallelism yet)",
}


def _rule(op, module, args, local, tp, vocab_sizes, is_output, graph, refuse, data):
    full = {p.name: p for p in local.values()}

    def replicated(reason: str) -> tuple[ModuleRule, dict]:
        return ModuleRule(module, op, REPLICATED), {
            p.name: ParamSplit(p.name, tuple(p.shape), REPLICATE, None, tuple(p.shape), how="replicated",
                               reason=reason, tied_to=p.tied_to) for p in full.values()}

    if op in _EXPECTED and not set(local) <= _EXPECTED[op]:  # e.g. LoRA adapters beside the weights
        return replicated(f"{op} with extra parameters ({', '.join(sorted(set(local) - _EXPECTED[op]))})")

    def split(key, kind, dim, sections=(), how="", tied_to=None):
        p = local[key]
        shape = tuple(p.shape)
        loc = list(shape)
        loc[dim] //= tp
        return ParamSplit(p.name, shape, kind, dim, tuple(loc), tuple(sections), how or kind, tied_to=p.tied_to)

    def keep(key, reason):
        p = local[key]
        return ParamSplit(p.name, tuple(p.shape), REPLICATE, None, tuple(p.shape), how="replicated",
                          reason=reason, tied_to=p.tied_to)

    if op == "attention":
        if args.get("qk_norm") and args.get("qk_norm_scope") == "projection":
            refuse(data, "QK-norm over the whole projection needs every head's q and k on one rank: "
                         "it is not tensor-parallel (qk_norm_scope=\"head\" is)")
            return replicated("")
        heads = args["heads"]
        kv = args["kv_heads"] if args["kv_heads"] is not None else heads
        hd = local["proj.weight"].shape[1] // heads
        counts = ((heads, "heads"),) if kv == heads else ((heads, "heads"), (kv, "kv_heads"))
        bad = [f"{n} {what}" for n, what in counts if n % tp]
        if bad:
            refuse(data, f"{' and '.join(bad)} do not divide over tensor-parallel size {tp} "
                         f"(each rank must hold whole heads)")
            return replicated("")
        out: dict[str, ParamSplit] = {}
        sections = (heads * hd, kv * hd, kv * hd)
        how = "column by heads" if kv == heads else "column by heads (q|k|v, GQA)"
        for key in local:
            if key.startswith("qkv."):
                out[local[key].name] = split(key, COLUMN, 0, sections, how)
            elif key == "proj.weight":
                out[local[key].name] = split(key, ROW, 1, (), "row")
            elif key == "proj.bias":
                out[local[key].name] = keep(key, "bias of a row-parallel layer: added after the all-reduce")
            else:
                out[local[key].name] = keep(key, "per-head norm: the same on every rank's heads")
        return ModuleRule(module, op, ATTENTION, heads // tp, kv // tp), out

    if op == "mlp":
        hidden = args["hidden"]
        if hidden % tp:
            refuse(data, f"hidden size {hidden} does not divide over tensor-parallel size {tp}")
            return replicated("")
        gated = bool(args.get("gated"))
        sections = (hidden, hidden) if gated else ()
        out = {}
        for key in local:
            if key.startswith("fc."):
                out[local[key].name] = split(key, COLUMN, 0, sections, "column (gate|up)" if gated else "column")
            elif key == "proj.weight":
                out[local[key].name] = split(key, ROW, 1, (), "row")
            else:
                out[local[key].name] = keep(key, "bias of a row-parallel layer: added after the all-reduce")
        return ModuleRule(module, op, MLP), out

    if op == "embedding":
        num = args["num"]
        if num % tp:
            padded = -(-num // (64 * tp)) * 64 * tp
            hint = f"--set vocab={padded}" if graph.hyper.get("vocab") == num else f"{padded} rows"
            refuse(data, f"the vocabulary of {num} rows does not divide over tensor-parallel size {tp}; "
                         f"round it up (e.g. {hint}: the tokenizer's ids stay below it)")
            return replicated("")
        return ModuleRule(module, op, EMBEDDING), {local["weight"].name: split("weight", VOCAB, 0, (), "vocab")}

    if op == "linear":
        weight = local["weight"]
        out_features = weight.shape[0]
        tied = weight.tied_to
        tied_to_embedding = tied is not None and graph.g.nodes[graph.params[tied].node]["op"] == "embedding"
        if tied_to_embedding or (is_output and out_features in vocab_sizes):
            if out_features % tp:
                if not tied_to_embedding:  # a tied head's embedding has said it already
                    refuse(data, f"the output head's {out_features} vocabulary rows do not divide over "
                                 f"tensor-parallel size {tp}")
                return replicated("")
            how = f"vocab (tied to {tied})" if tied else "vocab"
            out = {weight.name: split("weight", VOCAB, 0, (), how)}
            if "bias" in local:
                out[local["bias"].name] = split("bias", VOCAB, 0, (), "vocab")
            return ModuleRule(module, op, HEAD, tied_to=tied), out
        if tied is not None:
            return replicated("tied to a replicated weight")
        return replicated("a plain linear (hand-written block): replicated")

    return replicated(_REASONS.get(op, f"op '{op}' has no tensor-parallel rule"))


def fused_row_order(size: int, sections: tuple[int, ...], tp: int) -> list[int]:
    """The order of a fused tensor's `size` rows that makes each rank's contiguous 1/tp chunk its own
    share of every section: [q_0 | k_0 | v_0 | q_1 | k_1 | v_1 | ...]. permuted = canonical[order].
    No sections (or one): the identity."""
    if len(sections) <= 1:
        return list(range(size))
    assert sum(sections) == size and all(s % tp == 0 for s in sections)
    starts = [sum(sections[:i]) for i in range(len(sections))]
    order: list[int] = []
    for r in range(tp):
        for start, n in zip(starts, sections):
            part = n // tp
            order.extend(range(start + r * part, start + (r + 1) * part))
    return order


def inverse_order(order: list[int]) -> list[int]:
    inv = [0] * len(order)
    for i, j in enumerate(order):
        inv[j] = i
    return inv


def format_tensor_parallel_plan(plan: TensorParallelPlan) -> str:
    """A table: parameter (repeated layers folded), shape, split, per-rank shape, and why a parameter
    is replicated; then the totals."""
    header = ("parameter", "shape", "split", "per rank", "note")
    rows = [header, *plan.rows()]
    widths = [max(len(r[i]) for r in rows) for i in range(4)]
    lines = []
    for i, r in enumerate(rows):
        cells = [r[c].ljust(widths[c]) for c in range(4)]
        lines.append("  ".join(cells + ([r[4]] if r[4] else [])).rstrip())
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    total, mine = plan.total_parameters, plan.per_rank_parameters
    lines.append("")
    lines.append(f"tensor parallel over {plan.tp} ranks: {_count(total)} parameters, {_count(mine)} per rank "
                 f"({100 * mine / total:.1f}%)" if total else f"tensor parallel over {plan.tp} ranks: no parameters")
    if plan.sequence_parallel:
        lines.append("sequence parallel: between attention and MLP the residual stream, the norms and the "
                     f"position table run on 1/{plan.tp} of the sequence (all-gather in, reduce-scatter out)")
    return "\n".join(lines)


def _fold(rows):
    """Fold rows that differ only in the first numeric part of the name (a repeat's index)."""
    groups: dict[tuple, list[int]] = {}
    firsts: dict[tuple, int] = {}
    for i, (name, *rest) in enumerate(rows):
        m = re.search(r"(?:^|\.)(\d+)(?=\.|$)", name)
        if m is None:
            key = (name, *rest)
            groups.setdefault(key, [])
        else:
            key = (name[:m.start(1)] + "{}" + name[m.end(1):], *rest)
            groups.setdefault(key, []).append(int(m.group(1)))
        firsts.setdefault(key, i)
    out = []
    for key in sorted(groups, key=firsts.__getitem__):
        pattern, *rest = key
        idx = groups[key]
        if not idx:
            out.append((pattern, *rest))
        elif len(idx) == 1:
            out.append((pattern.replace("{}", str(idx[0])), *rest))
        else:
            out.append((pattern.replace("{}", "{" + _ranges(sorted(idx)) + "}"), *rest))
    return out


def _ranges(idx: list[int]) -> str:
    parts, start, prev = [], idx[0], idx[0]
    for i in idx[1:] + [None]:
        if i is not None and i == prev + 1:
            prev = i
            continue
        parts.append(str(start) if start == prev else f"{start}-{prev}")
        if i is not None:
            start = prev = i
    return ",".join(parts)


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def _fmt(shape) -> str:
    return "[" + ", ".join(str(d) for d in shape) + "]"


def _count(n: int) -> str:
    for unit, size in (("B", 10**9), ("M", 10**6), ("K", 10**3)):
        if n >= size:
            return f"{n / size:.2f}{unit}"
    return str(n)
