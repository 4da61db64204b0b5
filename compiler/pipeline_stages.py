"""Pipeline-parallel stages, cut from the model graph at repeat-layer boundaries.

`pipeline_stages(graph, pp)` splits the blocks (`block.0`, `block.1`, …) into `pp` contiguous runs:
stage 0 also holds what comes before the first block (embeddings), the last stage what comes after
the last block (final norm, head). The cut minimises the largest stage cost, where a stage's cost
is the larger of its share of the forward FLOPs per token and its share of the memory the graph
knows (weights, gradients and the two AdamW moments at 16 bytes a parameter, plus the activations
one micro-batch keeps for backward). Ties are broken towards even stages (least sum of squares).

A head tied to the embedding (`tie=wte`) is a cross-stage tie when pp > 1: the last stage keeps a
copy of the weight under the head's own name (`lm_head.weight`), and the runtime sums the two
copies' gradients every step, so both stay equal (Megatron's way). Such a copy is listed in
`Stage.tied_copies`, not in `Stage.parameters`: every parameter with its own storage is in
exactly one stage's `parameters`.

Nothing here imports torch: `lmspec info --pp N` prints the table without building the model.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from lmspec.dsl import ast
from lmspec.dsl.diagnostics import Diagnostic, SpecError

from .analysis import _numel, node_flops, symbol_values, tokens_per_forward
from .graph import ModelGraph
from .plan import SavedCall
from .registry import get_op
from .shapes import concrete_shape

STATE_BYTES_PER_PARAM = 16  # fp32 weight + gradient + AdamW's two moments


@dataclass
class Stage:
    index: int
    blocks: list[str]  # ["block.0", "block.1"]
    holds_embedding: bool  # what comes before the first block
    holds_head: bool  # what comes after the last block
    parameters: list[str] = field(default_factory=list)  # canonical names this stage owns
    tied_copies: dict[str, str] = field(default_factory=dict)  # name here -> the owner's name on another stage
    parameter_count: int = 0  # elements this stage stores, tied copies included
    flops_per_token: float = 0.0  # forward FLOPs per token
    activation_bytes_per_token: float = 0.0  # fp32, kept for backward, one micro-batch
    memory_bytes: float = 0.0  # 16 bytes per stored parameter + activations of one sequence
    cost: float = 0.0  # max(FLOP share, memory share): what the cut balances

    @property
    def mflops_per_token(self) -> float:
        return self.flops_per_token / 1e6


@dataclass
class _Unit:
    """A piece the cut cannot split: the prefix (embeddings), one block, or the suffix (head)."""
    name: str
    params: list[str] = field(default_factory=list)
    count: int = 0
    flops: float = 0.0
    act: float = 0.0


def _units(graph: ModelGraph, seq: int) -> tuple[_Unit, list[_Unit], _Unit, dict[str, str]]:
    values = symbol_values(graph, seq, 1)
    flops = node_flops(graph, values)
    tokens = tokens_per_forward(graph, values)
    pre, post = _Unit("(before the blocks)"), _Unit("(after the blocks)")
    blocks: dict[str, _Unit] = {}
    where: dict[str, _Unit] = {}
    for node_id, data in graph.nodes():
        block = data["block"]
        if block is not None:
            unit = blocks.setdefault(block, _Unit(block))
        else:
            unit = post if blocks else pre
        where[node_id] = unit
        unit.flops += flops.get(node_id, 0) / tokens
    units = [pre, *blocks.values(), post]
    for unit, act in zip(units, _activation_bytes(graph, seq, where, units)):
        unit.act = act / tokens
    tied: dict[str, str] = {}
    for p in graph.params.values():
        unit = where[p.node]
        if p.tied_to is None:
            unit.params.append(p.name)
            unit.count += _numel(p.shape)
        else:
            tied[p.name] = p.tied_to
    return pre, list(blocks.values()), post, tied


def _activation_bytes(graph: ModelGraph, seq: int, where: dict, units: list[_Unit]) -> list[float]:
    """fp32 bytes each unit's ops keep for backward for one sequence (plan.py's rules); the last
    unit also holds the logits and the loss's fp32 tensors."""
    values = symbol_values(graph, seq, 1)
    dtypes: dict[tuple[str, int], str] = {}
    kept: dict[int, dict[tuple, int]] = {id(u): {} for u in units}
    for node_id, data in graph.nodes():
        for i, (_, dtype) in enumerate(data["outputs"]):
            dtypes[(node_id, i)] = dtype
        if data["op"] == "input":
            continue
        op = get_op(data["op"])
        params = graph.node_params(node_id)
        for k in op.saved_for_backward(SavedCall(op, node_id, data, values, dtypes, None, params)):
            kept[id(where[node_id])][k.key] = k.bytes
    out = [float(sum(kept[id(u)].values())) for u in units]
    _, ref = graph.outputs[0]
    logits = _numel(concrete_shape(ref.shape, values)) * 4
    out[-1] += logits * 4  # the logits, cross-entropy's log-probabilities and its two gradients
    return out


def block_count(graph: ModelGraph) -> int:
    return len({d["block"] for _, d in graph.nodes() if d["block"] is not None})


def pipeline_stages(graph: ModelGraph, pp: int, seq: int | None = None) -> list[Stage]:
    """Cut the model into `pp` stages of contiguous blocks, balanced (see the module's docstring).
    `seq`: the sequence length FLOPs and activations are counted at (default: the context)."""
    if not isinstance(pp, int) or pp < 1:
        raise ValueError(f"pipeline parallelism needs a positive number of stages, got {pp!r}")
    seq = seq if seq is not None else graph.context
    pre, blocks, post, tied = _units(graph, seq)
    if pp > len(blocks):
        raise _too_many_stages(graph, pp, len(blocks))
    total_flops = sum(u.flops for u in [pre, *blocks, post]) or 1.0
    total_mem = sum(_memory(u) for u in [pre, *blocks, post]) or 1.0
    owner_unit = {name: u for u in [pre, *blocks, post] for name in u.params}
    suffix = _suffix_params(graph)
    holder = {name: _holder(graph, name, pre, blocks, post, suffix) for name in tied}

    n = len(blocks)
    flops_before, mem_before = [0.0], [0.0]  # prefix sums: a stage's cost in constant time
    for u in blocks:
        flops_before.append(flops_before[-1] + u.flops)
        mem_before.append(mem_before[-1] + _memory(u))
    position = {id(pre): -1, id(post): n, **{id(u): k for k, u in enumerate(blocks)}}
    ties = [(position[id(holder[name])], position[id(owner_unit[target])], _numel(graph.params[target].shape))
            for name, target in tied.items()]

    def cost(i: int, j: int, first: bool, last: bool) -> float:
        def inside(k: int) -> bool:
            return i <= k < j or (k == -1 and first) or (k == n and last)
        flops = flops_before[j] - flops_before[i] + (pre.flops if first else 0.0) + (post.flops if last else 0.0)
        mem = mem_before[j] - mem_before[i] + (_memory(pre) if first else 0.0) + (_memory(post) if last else 0.0)
        if pp > 1:  # a tied weight used here but owned elsewhere is stored here too
            mem += sum(size for at, owner, size in ties if inside(at) and not inside(owner)) * STATE_BYTES_PER_PARAM
        return max(flops / total_flops, mem / total_mem)

    cuts = (_exact_cuts if n <= EXACT_SEARCH_BLOCKS else _bisected_cuts)(n, pp, cost)
    stages = []
    for s in range(pp):
        i, j = cuts[s], cuts[s + 1]
        first, last = s == 0, s == pp - 1
        units = ([pre] if first else []) + blocks[i:j] + ([post] if last else [])
        stage = Stage(index=s, blocks=[u.name for u in blocks[i:j]], holds_embedding=first, holds_head=last)
        for u in units:
            stage.parameters += u.params
            stage.parameter_count += u.count
            stage.flops_per_token += u.flops
            stage.activation_bytes_per_token += u.act
        for name, target in tied.items():
            if any(holder[name] is u for u in units) and not any(owner_unit[target] is u for u in units):
                stage.tied_copies[name] = target
                stage.parameter_count += _numel(graph.params[target].shape)
        stage.memory_bytes = stage.parameter_count * STATE_BYTES_PER_PARAM + stage.activation_bytes_per_token * seq
        stage.cost = cost(i, j, first, last)
        stages.append(stage)
    return stages


EXACT_SEARCH_BLOCKS = 256  # up to here every cut is tried: pp * n^2 costs, under a second


def _exact_cuts(n: int, pp: int, cost) -> tuple[int, ...]:
    """(0, c1, …, n): the cut with the least largest stage cost, ties broken by the least sum of squares."""
    # best[k][j]: (largest cost, sum of squares, cut points) splitting blocks[:j] into k stages
    inf = (float("inf"), float("inf"), ())
    best = [[inf] * (n + 1) for _ in range(pp + 1)]
    best[0][0] = (0.0, 0.0, ())
    for k in range(1, pp + 1):
        for j in range(k, n - (pp - k) + 1):
            for i in range(k - 1, j):
                prev = best[k - 1][i]
                if prev[0] == float("inf"):
                    continue
                c = cost(i, j, k == 1, k == pp)
                cand = (max(prev[0], c), prev[1] + c * c, prev[2] + (j,))
                if cand[:2] < best[k][j][:2]:
                    best[k][j] = cand
    return (0,) + best[pp][n][2]


def _bisected_cuts(n: int, pp: int, cost) -> tuple[int, ...]:
    """The same cut for thousands of blocks, in n log n: the least largest stage cost found by bisection,
    each guess tried by filling stages greedily from the front (a stage's cost grows with its blocks)."""
    def fill(limit: float) -> list[int] | None:
        cuts, i = [0], 0
        while i < n:
            first, j = i == 0, i + 1
            while j < n and cost(i, j + 1, first, False) <= limit:
                j += 1
            cuts.append(j)
            i = j
        if len(cuts) - 1 > pp or cost(cuts[-2], n, len(cuts) == 2, True) > limit:
            return None
        while len(cuts) - 1 < pp:  # fewer stages than asked: split the longest (costs only fall)
            k = max(range(len(cuts) - 1), key=lambda s: cuts[s + 1] - cuts[s])
            cuts.insert(k + 1, (cuts[k] + cuts[k + 1]) // 2)
        return cuts

    low, high = 0.0, max(cost(0, n, True, True), 1e-12)
    best = fill(high) or [round(k * n / pp) for k in range(pp + 1)]
    for _ in range(40):
        middle = (low + high) / 2
        found = fill(middle)
        if found is None:
            low = middle
        else:
            best, high = found, middle
    return tuple(best)


def _memory(u: _Unit) -> float:
    return u.count * STATE_BYTES_PER_PARAM + u.act


def _holder(graph: ModelGraph, name: str, pre, blocks, post, suffix: set[str]) -> _Unit:
    """The unit whose op reads the tied parameter `name`."""
    data = graph.g.nodes[graph.params[name].node]
    if data["block"] is not None:
        return next(u for u in blocks if u.name == data["block"])
    return post if name in suffix else pre


def _suffix_params(graph: ModelGraph) -> set[str]:
    seen_block, after = False, set()
    for node_id, data in graph.nodes():
        if data["block"] is not None:
            seen_block = True
        elif seen_block:
            after.add(node_id)
    return {p.name for p in graph.params.values() if p.node in after}


def _too_many_stages(graph: ModelGraph, pp: int, n: int) -> SpecError:
    stems = []
    for _, data in graph.nodes():
        if data["block"] is not None:
            stem = data["block"].rsplit(".", 1)[0]
            if stem not in stems:
                stems.append(stem)
    span = _repeat_span(graph, stems[0]) if stems else None
    if n == 0:
        message = f"pipeline parallelism cuts at repeat-layer boundaries, and model '{graph.name}' has no `repeat`"
    else:
        message = (f"--pp {pp} needs at least {pp} repeated layers to cut between, but `repeat` makes {n}: "
                   f"use --pp {n} or fewer")
    return SpecError([Diagnostic(message, span, code="E201", file=graph.file)], graph.sources)


def _repeat_span(graph: ModelGraph, stem: str):
    """The span of the `repeat … as stem` statement in the model's source (None if not found)."""
    text = graph.sources.get(graph.file)
    if text is not None:
        try:
            from lmspec.dsl.parser import parse
            module = parse(text, graph.file)
        except SpecError:
            module = None
        for model in (module.models if module else []):
            if model.name != graph.name:
                continue
            for stmt in _walk(model.body):
                if isinstance(stmt, ast.Repeat) and stmt.name == stem.split(".")[-1]:
                    return stmt.span
    for _, data in graph.nodes():  # fall back on the first op inside the repeat
        if data["block"] is not None:
            return data["span"]
    return None


def _walk(body):
    for stmt in body:
        yield stmt
        if isinstance(stmt, ast.Repeat):
            yield from _walk(stmt.body)


def _blocks_text(stage: Stage) -> str:
    if not stage.blocks:
        text = "—"
    elif len(stage.blocks) == 1:
        text = stage.blocks[0]
    else:
        first, last = stage.blocks[0], stage.blocks[-1]
        stem = first.rsplit(".", 1)[0]
        text = f"{first}–{last.rsplit('.', 1)[1]}" if last.rsplit(".", 1)[0] == stem else f"{first}–{last}"
    parts = (["embed"] if stage.holds_embedding else []) + [text] + (["head"] if stage.holds_head else [])
    return " + ".join(parts)


def _count(n: float) -> str:
    for unit, scale in (("B", 1e9), ("M", 1e6), ("K", 1e3)):
        if n >= scale:
            return f"{n / scale:.2f}{unit}"
    return str(int(n))


def format_pipeline_stages(stages: list[Stage]) -> str:
    """A table of the stages: blocks, parameters, forward MFLOPs per token, activation KiB per token,
    the memory one sequence needs, each stage's cost as a share of the largest, and the imbalance."""
    header = ("stage", "blocks", "layers", "params", "MFLOPs/token", "act KiB/token", "memory", "vs largest")
    largest = max(s.cost for s in stages) or 1.0
    rows = []
    for s in stages:
        rows.append((str(s.index), _blocks_text(s), str(len(s.blocks)), _count(s.parameter_count),
                     f"{s.mflops_per_token:,.1f}", f"{s.activation_bytes_per_token / 1024:,.1f}",
                     f"{s.memory_bytes / 2**30:,.2f} GiB", f"{100 * s.cost / largest:.0f}%"))
    widths = [max(len(r[i]) for r in [header, *rows]) for i in range(len(header))]
    left = {1}

    def line(r):
        return "  ".join(c.ljust(w) if i in left else c.rjust(w) for i, (c, w) in enumerate(zip(r, widths))).rstrip()

    out = [line(header), line(tuple("-" * w for w in widths))] + [line(r) for r in rows]
    mean = sum(s.cost for s in stages) / len(stages)
    imbalance = 100 * (largest / mean - 1) if mean else 0.0
    out.append(f"imbalance: {imbalance:.1f}% (largest stage cost over the mean; cost = max(FLOP share, memory share), "
               f"memory = 16 B/parameter + activations of one sequence)")
    for s in stages:
        for name, target in s.tied_copies.items():
            out.append(f"stage {s.index} keeps a copy of {target} as {name} (tied): "
                       f"their gradients are summed each step")
    return "\n".join(out)
