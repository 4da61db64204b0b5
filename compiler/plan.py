"""What training a spec takes, read off its graph (no torch): parameters, FLOPs per token, the
compute a token budget needs and how long it runs, and memory per GPU under DDP and FSDP2.

Memory per GPU is weights + gradients + AdamW state (two fp32 moments) + activations:

- weights and gradients are fp32 (mixed precision keeps fp32 master weights and fp32 gradients, as
  torch.autocast does); under DDP autocast's 16-bit copies of the weights that matrix products use are
  kept for the backward pass too. FSDP2 (`fully_shard` per repeated block, the rest of the model as
  the root) divides weights, gradients and optimizer state by the GPU count and adds the unsharded
  parameters and gradients of the root and of two blocks (one computing, one prefetched), gathered in
  16-bit under mixed precision (MixedPrecisionPolicy(param_dtype=bf16)).
- activations come from walking the graph for one micro-batch: each op's registry rule
  (`Op.saved_for_backward`) says which tensors autograd keeps, a tensor kept by several ops counts
  once, and dtypes follow autocast (16-bit where an op runs in low precision). Then the loss, as
  runtime/train.py computes it: the logits (held by the training loop) and the fp32 cross-entropy:
  its log-probabilities kept for backward and, at the start of backward, two more [tokens, vocab] fp32
  gradients. With activation checkpointing per block only each block's input is kept, plus one
  block's activations while it is recomputed (after the loss's have been freed).
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .analysis import _numel, flops_per_token, parameter_count, symbol_values
from .graph import ModelGraph
from .registry import get_op
from .shapes import concrete_shape
from .values import TensorRef

BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i64": 8, "i32": 4, "bool": 1}
_FLOATS = ("f16", "bf16", "f32", "f64")
LOW_DTYPE = {"fp32": None, "bf16": "bf16", "fp16": "f16"}  # --precision -> autocast's dtype
STRATEGIES = ("ddp", "fsdp")
ADAM_BYTES = 8  # two fp32 moments per parameter
HEADROOM = 0.9  # "fits" when the total is within 90% of the GPU (CUDA context, fragmentation, NCCL)
CHINCHILLA_TOKENS_PER_PARAM = 20
H100_BF16_FLOPS = 989e12  # H100 SXM, dense bf16


# ---------------------------------------------------------------- quantities with units

_SI = {"": 1, "k": 1e3, "m": 1e6, "g": 1e9, "t": 1e12, "p": 1e15, "e": 1e18, "z": 1e21}
_NUMBER = r"\s*([0-9][0-9_,]*(?:\.[0-9]*)?(?:e[+-]?[0-9]+)?)\s*"


def _number(text: str) -> float:
    return float(text.replace("_", "").replace(",", ""))


def parse_bytes(text: str) -> float:
    """'80GB' (GB = 10^9 bytes), '80GiB' (2^30), '80G' (= GB), '512MB', '1.5TB'."""
    m = re.fullmatch(_NUMBER + r"([kmgtp]?)(i?)(b?)\s*", text.lower())
    if not m or not m.group(2) and not m.group(4):
        raise ValueError(f"{text!r} is not a memory size: give a unit, e.g. 80GB (10^9 bytes) or 80GiB (2^30 bytes)")
    value, prefix, binary = _number(m.group(1)), m.group(2), m.group(3)
    if binary and not prefix:
        raise ValueError(f"{text!r} is not a memory size: e.g. 80GB or 80GiB")
    scale = 1024 ** "kmgtp".index(prefix) * 1024 if binary else _SI[prefix]
    return value * scale


def parse_count(text: str) -> float:
    """A token count: '2T', '300B' (billion), '15e12', '1.5M', '20k', '1_000_000'."""
    m = re.fullmatch(_NUMBER + r"([kmbt]?)\s*", text.lower())
    if not m:
        raise ValueError(f"{text!r} is not a count: e.g. 15T, 300B, 2e12")
    return _number(m.group(1)) * {"": 1, "k": 1e3, "m": 1e6, "b": 1e9, "t": 1e12}[m.group(2)]


def parse_flops(text: str) -> float:
    """FLOPs or FLOP/s: '989e12', '989T', '989 TFLOPS', '1.98P', '3e24', '6e23 FLOPs'."""
    m = re.fullmatch(_NUMBER + r"([kmgtpez]?)\s*(?:flops?(?:/s)?)?\s*", text.lower())
    if not m:
        raise ValueError(f"{text!r} is not a FLOP count: e.g. 989e12, 989T, 3e24")
    return _number(m.group(1)) * _SI[m.group(2)]


# ---------------------------------------------------------------- activations: the graph walk

@dataclass(frozen=True)
class Kept:
    """One tensor autograd keeps: `key` names it, so that a tensor several ops keep counts once."""
    key: tuple
    bytes: int


class SavedCall:
    """What an op's `saved_for_backward` rule sees: its arguments, concrete shapes and dtypes under the
    planned precision, and the constructors of what it keeps (see `Op.saved_for_backward`)."""

    def __init__(self, op, node_id: str, data: dict, values: dict, dtypes: dict, low: str | None,
                 params: dict):
        self.op, self.node_id, self.args, self.params = op, node_id, data["args"], params
        self._dtypes, self._low = dtypes, low
        self._refs = {k: v for k, v in data["args"].items() if isinstance(v, TensorRef)}
        self.in_shapes = {k: concrete_shape(v.shape, values) for k, v in self._refs.items()}
        self.out_shapes = [concrete_shape(shape, values) for shape, _ in data["outputs"]]
        self._out_dtypes = [dtypes[(node_id, i)] for i in range(len(data["outputs"]))]
        self._count = 0

    @property
    def mixed(self) -> bool:
        return self._low is not None

    @property
    def compute(self) -> str:
        """The dtype the op computes in: 16-bit for matrix products under mixed precision, else f32."""
        if self._low and self.op.autocast == "lower":
            return self._low
        if self.op.autocast == "f32" or not self._out_dtypes:
            return "f32"
        return self._out_dtypes[0]

    def __getitem__(self, name):
        return self.args[name]

    def shape(self, name) -> tuple:
        return self.in_shapes[name]

    def dtype(self, name) -> str:
        ref = self._refs[name]
        return self._dtypes[(ref.node, ref.index)]

    def input(self, name: str, cast: bool = False) -> Kept:
        ref = self._refs[name]
        dtype = self._dtypes[(ref.node, ref.index)]
        n = _numel(self.in_shapes[name])
        if cast and self._low and dtype in _FLOATS and self.op.autocast in ("lower", "f32") and dtype != self.compute:
            return Kept(("cast", self.node_id, name), n * BYTES[self.compute])  # autocast's copy
        return Kept(("tensor", ref.node, ref.index), n * BYTES[dtype])

    def output(self, index: int = 0) -> Kept:
        return Kept(("tensor", self.node_id, index), _numel(self.out_shapes[index]) * BYTES[self._out_dtypes[index]])

    def new(self, shape, dtype: str | None = None) -> Kept:
        self._count += 1
        dtype = self.compute if dtype == "compute" else dtype or (self._out_dtypes[0] if self._out_dtypes else "f32")
        return Kept(("new", self.node_id, self._count), _numel(shape) * BYTES[dtype])


def _out_dtype(op, graph_dtype: str, in_dtypes: list[str], low: str | None) -> str:
    """An output's dtype under autocast (`low` is its 16-bit dtype; None: fp32 throughout)."""
    if low is None or graph_dtype not in _FLOATS:
        return graph_dtype
    if op.autocast == "lower":
        return low
    if op.autocast == "f32":
        return "f32"
    floats = [d for d in in_dtypes if d in _FLOATS]
    return max(floats, key=lambda d: BYTES[d]) if floats else graph_dtype


@dataclass
class Activations:
    """Bytes of activations for one micro-batch, by where they live."""
    outside: int  # kept by ops outside repeated blocks (embedding, final norm, head input)
    blocks: dict[str, int]  # kept by each repeated block's ops
    block_inputs: dict[str, int]  # each block's inputs: all a checkpointed block keeps
    logits: int  # the model's output, held by the training loop through backward
    loss_kept: int  # cross-entropy's fp32 log-probabilities (and the targets)
    loss_grads: int  # the two fp32 [tokens, vocab] gradients at the start of backward

    def total(self, checkpointing: bool) -> int:
        base = self.outside + self.logits
        loss = self.loss_kept + self.loss_grads
        if not checkpointing:
            return base + sum(self.blocks.values()) + loss
        # the loss's tensors are freed before the last block is recomputed: the peak is one or the other
        return base + sum(self.block_inputs.values()) + max(loss, max(self.blocks.values(), default=0))


def activations(graph: ModelGraph, seq: int, micro_batch: int, precision: str = "fp32") -> Activations:
    low = LOW_DTYPE[precision]
    values = symbol_values(graph, seq, micro_batch)
    dtypes: dict[tuple[str, int], str] = {}
    kept: dict[str | None, dict[tuple, int]] = {}  # block (None: outside) -> key -> bytes
    inputs: dict[str, dict[tuple, int]] = {}
    for node_id, data in graph.nodes():
        op = get_op(data["op"])
        refs = [v for v in data["args"].values() if isinstance(v, TensorRef)]
        in_dtypes = [dtypes[(r.node, r.index)] for r in refs]
        for i, (_, dtype) in enumerate(data["outputs"]):
            dtypes[(node_id, i)] = _out_dtype(op, dtype, in_dtypes, low)
        if data["op"] == "input":
            continue
        prefix = (data["module"] + ".") if data["module"] else ""
        params = {p.name[len(prefix):]: p.shape for p in graph.params.values() if p.node == node_id}
        call = SavedCall(op, node_id, data, values, dtypes, low, params)
        block = data["block"]
        for k in op.saved_for_backward(call):
            kept.setdefault(block, {})[k.key] = k.bytes
        if block is not None:
            for r in refs:
                if graph.g.nodes[r.node]["block"] != block:
                    n = _numel(concrete_shape(r.shape, values)) * BYTES[dtypes[(r.node, r.index)]]
                    inputs.setdefault(block, {})[("tensor", r.node, r.index)] = n
    _, logits_ref = graph.outputs[0]
    logits_shape = concrete_shape(logits_ref.shape, values)
    logits = _numel(logits_shape) * BYTES[dtypes[(logits_ref.node, logits_ref.index)]]
    loss = _numel(logits_shape) * 4  # one fp32 [tokens, vocab]
    targets = _numel(logits_shape[:-1]) * BYTES["i64"]
    blocks = {b: sum(k.values()) for b, k in kept.items() if b is not None}
    return Activations(outside=sum(kept.get(None, {}).values()), blocks=blocks,
                       block_inputs={b: sum(inputs.get(b, {}).values()) for b in blocks},
                       logits=logits, loss_kept=loss + targets, loss_grads=2 * loss)


# ---------------------------------------------------------------- the plan

@dataclass
class MemoryRow:
    strategy: str  # ddp | fsdp
    checkpointing: bool
    weights: float
    gradients: float
    optimizer: float
    activations: float

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def fits(self, gpu_memory: float) -> str:
        if self.total <= HEADROOM * gpu_memory:
            return "yes"
        return "tight" if self.total <= gpu_memory else "no"


@dataclass
class Budget:
    name: str
    tokens: float
    flops: float
    seconds: float


@dataclass
class Plan:
    model: str
    file: str
    parameters: int
    seq: int
    micro_batch: int
    gpus: int
    gpu_memory: float
    precision: str
    forward_flops_per_token: float
    training_flops_per_token: float
    mfu: float
    gpu_flops: float
    budgets: list[Budget]
    rows: list[MemoryRow]
    acts: Activations
    block_params: dict[str, int]  # parameters of each FSDP unit: the root (None) and each block
    autocast_copy_params: int  # parameters that autocast copies to 16-bit (those of matrix products)
    min_fsdp_gpus: dict[bool, int | None] = field(default_factory=dict)  # checkpointing -> fewest GPUs

    matmul_params: float = 0.0  # parameters a token meets in matrix products (forward FLOPs at seq 1, / 2)

    @property
    def six_n(self) -> float:
        return 6 * self.parameters

    @property
    def attention_flops_per_token(self) -> float:
        """Training FLOPs per token beyond 6 x the parameters of matrix products: attention's scores."""
        return self.training_flops_per_token - 6 * self.matmul_params

    @property
    def tokens_per_step(self) -> int:
        return self.gpus * self.micro_batch * self.seq


def _param_groups(graph: ModelGraph) -> dict[str | None, int]:
    groups: dict[str | None, int] = {}
    for p in graph.owned_params():
        block = graph.g.nodes[p.node]["block"]
        groups[block] = groups.get(block, 0) + _numel(p.shape)
    return groups


def _autocast_copy_params(graph: ModelGraph) -> int:
    """Parameters read by ops that autocast runs in 16-bit: each gets a 16-bit copy, kept for backward."""
    counted = set()
    for p in graph.params.values():
        if get_op(graph.g.nodes[p.node]["op"]).autocast == "lower" and len(p.shape) >= 2:
            counted.add(p.tied_to or p.name)
    owned = {p.name: _numel(p.shape) for p in graph.owned_params()}
    return sum(owned[name] for name in counted)


def memory_rows(graph: ModelGraph, acts: Activations, gpus: int, precision: str,
                strategies=STRATEGIES, checkpointing=(False, True)) -> list[MemoryRow]:
    n = parameter_count(graph)
    mixed = LOW_DTYPE[precision] is not None
    groups = _param_groups(graph)
    root = groups.get(None, 0)
    largest = max((v for k, v in groups.items() if k is not None), default=0)
    rows = []
    for strategy in strategies:
        for ckpt in checkpointing:
            a = acts.total(ckpt)
            if strategy == "ddp":
                copies = 2 * _autocast_copy_params(graph) if mixed else 0
                rows.append(MemoryRow("ddp", ckpt, 4 * n + copies, 4 * n, ADAM_BYTES * n, a))
            else:
                unsharded = root + 2 * largest  # the root stays gathered; one block computes, one prefetches
                rows.append(MemoryRow("fsdp", ckpt, 4 * n / gpus + unsharded * (2 if mixed else 4),
                                      4 * n / gpus + unsharded * 4, ADAM_BYTES * n / gpus, a))
    return rows


def min_fsdp_gpus(graph: ModelGraph, acts: Activations, precision: str, gpu_memory: float,
                  checkpointing: bool) -> int | None:
    """The fewest GPUs on which FSDP fits (within the headroom); None when no count does."""
    one = memory_rows(graph, acts, 1, precision, ("fsdp",), (checkpointing,))[0]
    sharded = (4 + 4 + ADAM_BYTES) * parameter_count(graph)
    fixed = one.total - sharded
    room = HEADROOM * gpu_memory - fixed
    if room <= 0:
        return None
    return max(1, math.ceil(sharded / room))


def make_plan(graph: ModelGraph, *, gpus: int = 1, gpu_memory: float = 80e9, seq: int | None = None,
              micro_batch: int = 1, precision: str = "fp32", tokens: float | None = None,
              compute: float | None = None, mfu: float = 0.4, gpu_flops: float = H100_BF16_FLOPS,
              strategies=STRATEGIES, checkpointing=(False, True)) -> Plan:
    seq = seq or graph.context
    n = parameter_count(graph)
    fwd = flops_per_token(graph, seq)
    train = 3 * fwd
    rate = gpus * gpu_flops * mfu

    def budget(name, t):
        return Budget(name, t, t * train, t * train / rate)

    budgets = [budget("chinchilla", CHINCHILLA_TOKENS_PER_PARAM * n)]
    if tokens is not None:
        budgets.append(budget("tokens", tokens))
    if compute is not None:
        budgets.append(budget("compute", compute / train))
    acts = activations(graph, seq, micro_batch, precision)
    rows = memory_rows(graph, acts, gpus, precision, strategies, checkpointing)
    groups = _param_groups(graph)
    return Plan(graph.name, graph.file, n, seq, micro_batch, gpus, gpu_memory, precision, fwd, train, mfu,
                gpu_flops, budgets, rows, acts, groups, _autocast_copy_params(graph),
                {c: min_fsdp_gpus(graph, acts, precision, gpu_memory, c) for c in (False, True)},
                # at seq 1 attention's scores cost next to nothing: what is left is 2 FLOPs per weight
                matmul_params=flops_per_token(graph, 1) / 2)
