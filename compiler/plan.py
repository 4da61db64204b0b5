"""What training a spec takes, read off its graph (no torch): parameters, FLOPs per token, the
compute a token budget needs and how long it runs, and memory per GPU under DDP and FSDP2 (and, for
the 3-D layouts, FSDP2 with CPU offload, whose state lives in host memory).

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
  runtime/train/loop.py computes it: the logits (held by the training loop) and the fp32 cross-entropy:
  its log-probabilities kept for backward and, at the start of backward, two more [tokens, vocab] fp32
  gradients. With activation checkpointing per block only each block's input is kept, plus one
  block's activations while it is recomputed (after the loss's have been freed).

3-D layouts (`layouts`): dp x tp x pp = GPUs, ranks ordered tp fastest, then dp, then pp (Megatron's
order), so tp stays inside a node, dp crosses nodes once tp x dp exceeds one, and pp once the layout does.

- Tensor parallelism (Megatron): q/k/v and MLP up/gate are column-parallel and attention's out and
  MLP's down row-parallel, so a block needs one all-reduce after each row-parallel matrix forward and
  one at each column-parallel input backward: 4 all-reduces of a [micro-batch, seq, dim] 16-bit tensor
  per block per micro-batch, plus one each for the vocab-parallel embedding (forward) and head
  (backward). A ring all-reduce sends 2(tp-1)/tp of the tensor per GPU. Sequence parallelism swaps each
  for an all-gather + reduce-scatter (the same bytes) and splits what tp alone replicates. Weights: the
  matrices of attention, mlp and moe, the embedding and the head are divided by tp; norms, learned
  positions and the row-parallel biases are not. Activations: what attention/mlp/moe make inside
  themselves (q/k/v, the heads' output, the MLP's hidden) is divided by tp; their inputs and all else
  at the block boundary (norm inputs, the residual) are replicated, which is Korthikanti et al.'s
  `10 sbh` replicated part. The logits and the vocab-parallel cross-entropy are divided by tp.
  Hand-written attention (matmul/softmax) is not recognised: its activations count as replicated.
- Pipeline parallelism: contiguous blocks per stage (the spare ones on the later stages, since stage 0
  already holds the most); the embedding goes with stage 0, the final norm and head with the last, a
  tied head keeps its own copy of the embedding there. Under 1F1B stage s holds min(pp - s, m)
  micro-batches' activations (it has run that many forwards before its first backward); GPipe holds all
  m. With checkpointing only the block inputs are multiplied, the recomputed block is one. Each stage
  sends one [micro-batch, seq, dim] residual (its dtype in the walk: fp32 under autocast; 1/tp of it
  with sequence parallelism) forward and receives its gradient back per micro-batch.
  m = global batch / (dp x micro-batch) must be >= pp; the bubble is (pp-1)/(m+pp-1) of the time.
- Data parallelism over the layout's copies: DDP all-reduces the fp32 gradients once per step
  (2(dp-1)/dp of them per GPU); FSDP2 all-gathers the parameters (16-bit under autocast) forward and
  backward and reduce-scatters fp32 gradients (runtime/distributed/fsdp.py's reduce_dtype) for every
  micro-batch, which is what sharding, as its memory counts it (only two blocks unsharded), costs.
- CPU offload ("offload": FSDP2's CPUOffloadPolicy, `lmspec train --strategy fsdp --cpu-offload`; only
  with pp = 1 and dp > 1, as the trainer runs it): the sharded fp32 weights and gradients and AdamW's two
  moments live in host memory, 16 bytes x p / dp per GPU (p: a GPU's parameters after the tp split), x the
  GPUs of a node per node, which must fit within HEADROOM of the node's host memory. The GPU keeps FSDP's
  unsharded part only (the root and two blocks: weights, 16-bit under autocast, and fp32 gradients) and
  the activations; no optimizer state. Each micro-batch copies the fp32 weight shard host -> device for
  the forward and for the backward all-gather and the fp32 gradient shard back, 12 x p / dp bytes over
  PCIe per GPU, which overlaps compute as FSDP's collectives do (the two add up before the window is
  subtracted); the NVLink/network traffic is FSDP's. AdamW then steps on the CPU, not overlapped: 28
  bytes of host memory traffic per parameter (it reads the weight, the gradient and the two moments and
  writes back all but the gradient) x p / dp at HOST_OPTIMIZER_BANDWIDTH per GPU.
- Time: a stage's time per micro-batch is its FLOPs on one GPU (1/tp of its ops') x 3, plus a forward of
  its blocks under checkpointing, at the assumed MFU of the GPU's peak, plus its tp and pp traffic,
  which sit on the critical path (Megatron's all-reduces block; p2p is mostly exposed). A pipeline runs
  m + pp - 1 slots of the slowest stage: compute x (1 + (pp-1)/m), i.e. the bubble fraction above of
  the total. Data-parallel traffic overlaps compute: DDP's bucketed all-reduce the last micro-batch's
  backward, FSDP's prefetched collectives (and offload's PCIe copies) all of it; only what exceeds that
  is added, and then offload's CPU optimizer step. Bandwidths are per GPU per direction: NVLink within
  a node, the network (one NIC per GPU) between nodes, PCIe to the host. Latency is ignored, so times
  under milliseconds are optimistic.
"""
from __future__ import annotations

import math
import re
from dataclasses import dataclass, field

from .analysis import _numel, flops_per_token, node_flops, parameter_count, symbol_values
from .graph import ModelGraph
from .registry import get_op
from .shapes import concrete_shape
from .values import TensorRef

BYTES = {"f64": 8, "f32": 4, "bf16": 2, "f16": 2, "i64": 8, "i32": 4, "bool": 1}
_FLOATS = ("f16", "bf16", "f32", "f64")
LOW_DTYPE = {"fp32": None, "bf16": "bf16", "fp16": "f16"}  # --precision -> autocast's dtype
STRATEGIES = ("ddp", "fsdp")  # the memory table's
LAYOUT_STRATEGIES = STRATEGIES + ("offload",)  # the 3-D layouts' (offload: FSDP2 with CPU offload)
ADAM_BYTES = 8  # two fp32 moments per parameter
HEADROOM = 0.9  # "fits" when the total is within 90% of the GPU (CUDA context, fragmentation, NCCL)
CHINCHILLA_TOKENS_PER_PARAM = 20
H100_BF16_FLOPS = 989e12  # H100 SXM, dense bf16
SCHEDULES = ("1f1b", "gpipe")
NVLINK_BANDWIDTH = 450e9  # bytes/s per direction per GPU: H100 SXM NVLink 4 (900 GB/s both ways)
NETWORK_BANDWIDTH = 50e9  # bytes/s per GPU between nodes: one 400 Gb/s InfiniBand NIC per GPU
GPUS_PER_NODE = 8
BACKWARD_SHARE = 2 / 3  # of a micro-batch's training FLOPs: backward is twice forward
TP_OPS = ("attention", "mlp", "moe")  # ops that Megatron-style tensor parallelism splits inside
HOST_MEMORY = 2e12  # bytes of host memory per node: a DGX H100's 2 TB
PCIE_BANDWIDTH = 50e9  # bytes/s per GPU per direction to the host: PCIe Gen5 x16 (64 GB/s), as copies attain
# bytes/s of host memory traffic per GPU that a CPU AdamW step attains: assumed, about a quarter of a DGX
# H100's peak per GPU (2 sockets x 8 channels of DDR5-4800 = 614 GB/s, 77 GB/s per GPU)
HOST_OPTIMIZER_BANDWIDTH = 20e9
CPU_ADAM_BYTES = 28  # per parameter: reads fp32 weight, gradient, two moments; writes weight, two moments


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
    # for 3-D layouts (see `layouts`): the part of each block's bytes that tensor parallelism splits
    # (what attention, mlp and moe make inside themselves), the part of `outside` kept before the first
    # block (the first pipeline stage's; the rest is the last stage's), and one block input's elements
    blocks_split: dict[str, int] = field(default_factory=dict)
    outside_first: int = 0
    boundary_numel: int = 0
    boundary_bytes: int = 0

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
    split: dict[str | None, dict[tuple, bool]] = {}  # ... -> key -> split by tensor parallelism
    inputs: dict[str, dict[tuple, int]] = {}
    first: set[tuple] = set()  # keys kept outside the blocks before the first block
    boundary = (0, 0)
    for node_id, data in graph.nodes():
        op = get_op(data["op"])
        refs = [v for v in data["args"].values() if isinstance(v, TensorRef)]
        in_dtypes = [dtypes[(r.node, r.index)] for r in refs]
        for i, (_, dtype) in enumerate(data["outputs"]):
            dtypes[(node_id, i)] = _out_dtype(op, dtype, in_dtypes, low)
        if data["op"] == "input":
            continue
        params = graph.node_params(node_id)
        call = SavedCall(op, node_id, data, values, dtypes, low, params)
        block = data["block"]
        kept.setdefault(block, {})  # a block that keeps nothing (`x = x + 1`) is a block all the same
        split.setdefault(block, {})
        for k in op.saved_for_backward(call):
            kept.setdefault(block, {})[k.key] = k.bytes
            split.setdefault(block, {})[k.key] = data["op"] in TP_OPS and k.key[0] == "new"
            if block is None and not inputs:
                first.add(k.key)
        if block is not None:
            for r in refs:
                if graph.g.nodes[r.node]["block"] != block:
                    numel = _numel(concrete_shape(r.shape, values))
                    n = numel * BYTES[dtypes[(r.node, r.index)]]
                    inputs.setdefault(block, {})[("tensor", r.node, r.index)] = n
                    boundary = boundary if boundary[0] else (numel, n)
    _, logits_ref = graph.outputs[0]
    logits_shape = concrete_shape(logits_ref.shape, values)
    logits = _numel(logits_shape) * BYTES[dtypes[(logits_ref.node, logits_ref.index)]]
    loss = _numel(logits_shape) * 4  # one fp32 [tokens, vocab]
    targets = _numel(logits_shape[:-1]) * BYTES["i64"]
    blocks = {b: sum(k.values()) for b, k in kept.items() if b is not None}
    outside = kept.get(None, {})
    return Activations(outside=sum(outside.values()), blocks=blocks,
                       block_inputs={b: sum(inputs.get(b, {}).values()) for b in blocks},
                       logits=logits, loss_kept=loss + targets, loss_grads=2 * loss,
                       blocks_split={b: sum(n for k, n in kept[b].items() if split[b][k]) for b in blocks},
                       outside_first=sum(n for k, n in outside.items() if k in first),
                       boundary_numel=boundary[0], boundary_bytes=boundary[1])


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
        return _fits(self.total, gpu_memory)


_VERDICTS = ("yes", "tight", "no")


def _fits(total: float, capacity: float) -> str:
    if total <= HEADROOM * capacity:
        return "yes"
    return "tight" if total <= capacity else "no"


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
    grid: LayoutPlan | None = None  # 3-D layouts on `gpus`
    # when none of them fits: the fewest GPUs (doubling `gpus`) on which one does, and the fastest there
    grid_more: tuple[int, Layout] | None = None

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
              strategies=LAYOUT_STRATEGIES, checkpointing=(False, True), global_batch: int | None = None,
              schedule: str = "1f1b", sequence_parallel: bool = False, gpus_per_node: int = GPUS_PER_NODE,
              nvlink_bandwidth: float = NVLINK_BANDWIDTH, network_bandwidth: float = NETWORK_BANDWIDTH,
              host_memory: float = HOST_MEMORY, pcie_bandwidth: float = PCIE_BANDWIDTH,
              host_optimizer_bandwidth: float = HOST_OPTIMIZER_BANDWIDTH) -> Plan:
    """`strategies` name the layouts' data parallelism; the memory table shows those of them it knows
    (ddp, fsdp)."""
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
    rows = memory_rows(graph, acts, gpus, precision, [s for s in strategies if s in STRATEGIES], checkpointing)
    groups = _param_groups(graph)
    options = dict(seq=seq, micro_batch=micro_batch, precision=precision, mfu=mfu, gpu_flops=gpu_flops,
                   schedule=schedule, sequence_parallel=sequence_parallel, strategies=strategies,
                   checkpointing=checkpointing, gpus_per_node=gpus_per_node, nvlink_bandwidth=nvlink_bandwidth,
                   network_bandwidth=network_bandwidth, host_memory=host_memory, pcie_bandwidth=pcie_bandwidth,
                   host_optimizer_bandwidth=host_optimizer_bandwidth)
    grid = layouts(graph, acts, gpus=gpus, global_batch=global_batch, **options)
    more = None
    if not any(x.fits(gpu_memory) == "yes" for x in grid.layouts):
        more_gpus = gpus * 2
        while more_gpus <= 16384 and more is None:
            # the same micro-batches per GPU: a given global batch grows with the GPUs
            batch = global_batch and global_batch * more_gpus // gpus
            found = [x for x in layouts(graph, acts, gpus=more_gpus, global_batch=batch, **options).layouts
                     if x.fits(gpu_memory) == "yes"]
            more = (more_gpus, found[0]) if found else None
            more_gpus *= 2
    return Plan(graph.name, graph.file, n, seq, micro_batch, gpus, gpu_memory, precision, fwd, train, mfu,
                gpu_flops, budgets, rows, acts, groups, _autocast_copy_params(graph),
                {c: min_fsdp_gpus(graph, acts, precision, gpu_memory, c) for c in (False, True)},
                # at seq 1 attention's scores cost next to nothing: what is left is 2 FLOPs per weight
                matmul_params=flops_per_token(graph, 1) / 2, grid=grid, grid_more=more)


# ---------------------------------------------------------------- 3-D layouts: data x tensor x pipeline



@dataclass
class Stage:
    """One pipeline stage as one of its GPUs sees it, before data parallelism: parameters after the
    tensor-parallel split, its blocks, and the forward FLOPs of one micro-batch on one GPU."""
    index: int
    blocks: list[str]
    params: float  # parameters held (tied weights copied onto a second stage count twice)
    copies: float  # of those, the ones autocast copies to 16-bit (matrices of matrix products)
    root: float  # of those, the ones outside the blocks (FSDP's root, kept unsharded)
    largest: float  # parameters of its largest block
    flops: float  # forward FLOPs of one micro-batch, on one GPU
    block_flops: float  # of which in blocks (recomputed under activation checkpointing)
    tp_edges: int  # vocab-parallel embedding / head ops: one all-reduce each per micro-batch


@dataclass
class Layout:
    dp: int
    tp: int
    pp: int
    strategy: str  # ddp | fsdp | offload: how the dp replicas hold the state
    checkpointing: bool
    sequence_parallel: bool
    micro_batches: int  # per step, per pipeline (gradient accumulation when pp = 1)
    stage: int  # the stage of the worst GPU (most memory)
    weights: float
    gradients: float
    optimizer: float
    activations: float
    comm: dict[str, float]  # bytes each GPU sends per step: dp, tp, pp (the busiest stage's), pcie (offload)
    links: dict[str, str]  # dp / pp: "nvlink" or "network"
    bubble: float  # fraction of the pipeline's time a stage idles: (pp-1)/(m+pp-1)
    compute_s: float  # m micro-batches' compute on the slowest stage, no bubble
    step_s: float
    # exposed seconds: bubble, tp, pp, dp (with offload's PCIe copies), offload (its CPU optimizer step)
    times: dict[str, float] = field(default_factory=dict)
    host: float = 0.0  # bytes per GPU in host memory (offload's state)
    host_node: float = 0.0  # ... per node: host x the GPUs of a node
    host_memory: float = math.inf  # bytes of host memory per node

    @property
    def total(self) -> float:
        return self.weights + self.gradients + self.optimizer + self.activations

    def fits(self, gpu_memory: float) -> str:
        """The worse of the GPU's verdict and the host's (per node)."""
        return max(_fits(self.total, gpu_memory), _fits(self.host_node, self.host_memory), key=_VERDICTS.index)

    @property
    def name(self) -> str:
        return f"dp={self.dp} tp={self.tp} pp={self.pp}"


@dataclass
class LayoutPlan:
    layouts: list[Layout]  # every layout considered, fastest first
    global_batch: int  # sequences per optimizer step
    schedule: str
    gpus_per_node: int
    nvlink_bandwidth: float
    network_bandwidth: float
    tp_limits: dict[str, list[int]]  # what tp must divide: heads, kv_heads, hidden
    max_tp: int
    host_memory: float = HOST_MEMORY  # per node
    pcie_bandwidth: float = PCIE_BANDWIDTH
    host_optimizer_bandwidth: float = HOST_OPTIMIZER_BANDWIDTH


def _tp_split(op: str, local: str, out_dim: int | None, width: int) -> bool:
    """Whether Megatron-style tensor parallelism splits this parameter over the tp GPUs."""
    if op == "attention":
        return not (local.endswith("norm.weight") or local == "proj.bias")  # row-parallel's bias
    if op == "mlp":
        return local != "proj.bias"
    if op == "moe":
        return local != "router.weight"
    if op == "embedding":
        return True  # vocab-parallel
    if op == "linear":  # the head (vocab-parallel) or a matrix in a block: column or row parallel
        return local == "weight" or out_dim != width
    return False  # norms, learned positions: replicated


def tp_limits(graph: ModelGraph) -> dict[str, list[int]]:
    heads, kv, hidden = set(), set(), set()
    for _, data in graph.nodes():
        if data["op"] == "attention":
            a = data["args"]
            heads.add(a["heads"])
            kv.add(a["kv_heads"] if a.get("kv_heads") is not None else a["heads"])
        elif data["op"] in ("mlp", "moe"):
            hidden.add(data["args"]["hidden"])
    return {"heads": sorted(heads), "kv_heads": sorted(kv), "hidden": sorted(hidden)}


def stages(graph: ModelGraph, pp: int, tp: int, seq: int, micro_batch: int, width: int,
           flops: dict[str, int] | None = None) -> list[Stage]:
    """Contiguous blocks per stage, as even as can be with the extra ones on the later stages (stage 0
    holds the most micro-batches in flight); what precedes the blocks goes with stage 0, what follows
    them with the last."""
    if flops is None:
        flops = node_flops(graph, symbol_values(graph, seq, micro_batch))
    order: list[str] = []
    where: dict[str, int] = {}  # node -> stage
    for node_id, data in graph.nodes():
        b = data["block"]
        if b is not None and b not in order:
            order.append(b)
    base, extra = divmod(len(order), pp)
    sizes = [base + (i >= pp - extra) for i in range(pp)]
    of_block, i = {}, 0
    for s, size in enumerate(sizes):
        for b in order[i:i + size]:
            of_block[b] = s
        i += size
    out = [Stage(s, order[sum(sizes[:s]):sum(sizes[:s + 1])], 0, 0, 0, 0, 0, 0, 0) for s in range(pp)]
    seen_block = False
    per_block: dict[str, float] = {}
    for node_id, data in graph.nodes():
        b = data["block"]
        seen_block = seen_block or b is not None
        s = of_block[b] if b is not None else (pp - 1 if seen_block else 0)
        where[node_id] = s
        st = out[s]
        f = flops.get(node_id, 0)
        st.flops += f / tp
        if b is not None:
            st.block_flops += f / tp
        elif data["op"] in ("embedding", "linear") and tp > 1:
            st.tp_edges += 1
    held: list[dict[str, bool]] = [{} for _ in range(pp)]  # stage -> owner's name -> copied to 16-bit
    for p in graph.params.values():
        data = graph.g.nodes[p.node]
        name, s = p.tied_to or p.name, where[p.node]
        lowered = get_op(data["op"]).autocast == "lower" and len(p.shape) >= 2
        held[s][name] = held[s].get(name, False) or lowered
    for s, names in enumerate(held):
        st = out[s]
        for name, lowered in names.items():
            owner = graph.params[name]
            data = graph.g.nodes[owner.node]
            prefix = (data["module"] + ".") if data["module"] else ""
            out_dim = data["args"].get("out") if data["op"] == "linear" else None
            split = _tp_split(data["op"], owner.name[len(prefix):], out_dim, width)
            n = _numel(owner.shape) / (tp if split else 1)
            st.params += n
            st.copies += n if lowered else 0
            b = data["block"]
            if b is None:
                st.root += n
            else:
                per_block[b] = per_block.get(b, 0) + n
    for st in out:
        st.largest = max((per_block.get(b, 0) for b in st.blocks), default=0)
    return out


def _stage_activations(acts: Activations, st: Stage, last: bool, tp: int, sp: bool, ckpt: bool,
                       in_flight: int) -> float:
    rep = tp if sp else 1  # sequence parallelism splits what plain tensor parallelism replicates
    blocks = [acts.blocks_split.get(b, 0) / tp + (acts.blocks[b] - acts.blocks_split.get(b, 0)) / rep
              for b in st.blocks]
    outside = (acts.outside_first if st.index == 0 else 0) + (acts.outside - acts.outside_first if last else 0)
    logits, kept, grads = (acts.logits / tp, acts.loss_kept / tp, acts.loss_grads / tp) if last else (0, 0, 0)
    if not ckpt:
        return in_flight * (outside + sum(blocks) + logits + kept) + grads
    inputs = sum(acts.block_inputs[b] for b in st.blocks) / rep
    return (in_flight * (outside + inputs + logits) + (in_flight - 1) * kept
            + max(kept + grads, max(blocks, default=0)))


def layouts(graph: ModelGraph, acts: Activations, *, gpus: int, seq: int, micro_batch: int, precision: str,
            mfu: float, gpu_flops: float, global_batch: int | None = None, schedule: str = "1f1b",
            sequence_parallel: bool = False, strategies=LAYOUT_STRATEGIES, checkpointing=(False, True),
            gpus_per_node: int = GPUS_PER_NODE, nvlink_bandwidth: float = NVLINK_BANDWIDTH,
            network_bandwidth: float = NETWORK_BANDWIDTH, host_memory: float = HOST_MEMORY,
            pcie_bandwidth: float = PCIE_BANDWIDTH,
            host_optimizer_bandwidth: float = HOST_OPTIMIZER_BANDWIDTH) -> LayoutPlan:
    """Every dp x tp x pp = gpus layout the model allows, with memory, traffic and time per step."""
    low = LOW_DTYPE[precision]
    mixed = low is not None
    act_bytes = BYTES[low or "f32"]  # what tensor parallelism all-reduces: the 16-bit outputs of matmuls
    global_batch = global_batch or 8 * gpus * micro_batch
    width = acts.boundary_numel // (micro_batch * seq) if acts.boundary_numel else 0
    limits = tp_limits(graph)
    max_tp = min(gpus_per_node, gpus)
    n_blocks = len(acts.blocks)
    flops = node_flops(graph, symbol_values(graph, seq, micro_batch))
    rate = gpu_flops * mfu
    found = []
    tp = 1
    while tp <= max_tp:
        ok = gpus % tp == 0 and all(v % tp == 0 for vs in limits.values() for v in vs)
        # a stage holds at least one block: a pp above that is no layout, however many GPUs there are
        for pp in range(1, min(gpus // tp, max(n_blocks, 1)) + 1) if ok else ():
            if (gpus // tp) % pp:
                continue
            dp = gpus // (tp * pp)
            if global_batch % (dp * micro_batch):
                continue
            m = global_batch // (dp * micro_batch)
            if pp > 1 and m < pp:
                continue
            sts = stages(graph, pp, tp, seq, micro_batch, width, flops)
            sp = sequence_parallel and tp > 1
            links = {"dp": "nvlink" if tp * dp <= gpus_per_node else "network",
                     "pp": "nvlink" if gpus <= gpus_per_node else "network"}
            bw = {"nvlink": nvlink_bandwidth, "network": network_bandwidth,
                  "pcie": pcie_bandwidth, "host": host_optimizer_bandwidth}
            for strategy in strategies:
                if strategy != "ddp" and dp == 1:
                    continue  # nothing to shard over
                if strategy == "offload" and pp > 1:
                    continue  # the trainer's CPU offload does not run with pipeline parallelism
                for ckpt in checkpointing:
                    x = _layout(acts, sts, dp, tp, pp, m, strategy, ckpt, sp, schedule, mixed, act_bytes, rate,
                                links, bw, nvlink_bandwidth)
                    x.host_node, x.host_memory = x.host * min(gpus_per_node, gpus), host_memory
                    found.append(x)
        tp *= 2
    found.sort(key=lambda x: (x.step_s, x.total))
    return LayoutPlan(found, global_batch, schedule, gpus_per_node, nvlink_bandwidth, network_bandwidth,
                      limits, max_tp, host_memory, pcie_bandwidth, host_optimizer_bandwidth)


def _layout(acts, sts, dp, tp, pp, m, strategy, ckpt, sp, schedule, mixed, act_bytes, rate, links, bw,
            nvlink) -> Layout:
    mem, comm, per_mb, t_compute, t_dp, t_cpu, host = [], [], [], [], [], [], []
    offload = strategy == "offload"
    ring = 2 * (tp - 1) / tp  # bytes a GPU sends in a ring all-reduce, per byte reduced
    for st in sts:
        last = st.index == pp - 1
        in_flight = 1 if pp == 1 else (min(pp - st.index, m) if schedule == "1f1b" else m)
        p = st.params
        if strategy == "ddp":
            state = (4 * p + (2 * st.copies if mixed else 0), 4 * p, ADAM_BYTES * p)
        else:
            unsharded = st.root + min(2, len(st.blocks)) * st.largest
            gathered = (unsharded * (2 if mixed else 4), unsharded * 4)  # weights, gradients
            if offload:  # the shards live in host memory
                state = (*gathered, 0.0)
            else:
                state = (4 * p / dp + gathered[0], 4 * p / dp + gathered[1], ADAM_BYTES * p / dp)
        host.append((4 + 4 + ADAM_BYTES) * p / dp if offload else 0.0)
        a = _stage_activations(acts, st, last, tp, sp, ckpt, in_flight)
        mem.append((*state, a))
        # bytes sent per micro-batch: tensor parallelism's all-reduces (or all-gather + reduce-scatter
        # under sequence parallelism: the same bytes), 4 per block and 1 per vocab-parallel op;
        # the pipeline's activations forward and their gradients backward
        tp_b = (4 * len(st.blocks) + st.tp_edges) * ring * acts.boundary_numel * act_bytes if tp > 1 else 0
        pp_b = ((not last) + (st.index > 0)) * acts.boundary_bytes / (tp if sp else 1) if pp > 1 else 0
        if dp == 1:
            dp_b = 0
        elif strategy == "ddp":  # one all-reduce of the fp32 gradients per step
            dp_b = 2 * (dp - 1) / dp * 4 * p
        else:  # per micro-batch: all-gather forward and backward, reduce-scatter the fp32 gradients
            dp_b = m * (dp - 1) / dp * p * (2 * (2 if mixed else 4) + 4)
        # offload: per micro-batch the fp32 weight shard to the GPU for the forward's and the backward's
        # all-gathers, the fp32 gradient shard back
        pcie_b = m * (2 * 4 + 4) * p / dp if offload else 0.0
        comm.append({"dp": dp_b, "tp": m * tp_b, "pp": m * pp_b, "pcie": pcie_b})
        tc = (3 * st.flops + ckpt * st.block_flops) / rate
        t_compute.append(tc)
        per_mb.append(tc + tp_b / nvlink + pp_b / bw[links["pp"]])
        # data parallel traffic hides behind compute: DDP's behind the last micro-batch's backward, FSDP's
        # (prefetched, per micro-batch) behind all of it
        window = BACKWARD_SHARE * tc if strategy == "ddp" else m * tc
        t_dp.append(max(0.0, dp_b / bw[links["dp"]] + pcie_b / bw["pcie"] - window))
        t_cpu.append(CPU_ADAM_BYTES * p / dp / bw["host"] if offload else 0.0)  # after the backward: no overlap
    worst = max(range(pp), key=lambda s: sum(mem[s]))
    slowest = max(per_mb)
    step = (m + pp - 1) * slowest + max(t_dp) + max(t_cpu)
    compute = m * max(t_compute)
    s = max(range(pp), key=lambda i: per_mb[i])
    times = {"bubble": (pp - 1) * slowest,
             "tp": m * comm[s]["tp"] / m / nvlink if tp > 1 else 0.0,
             "pp": m * comm[s]["pp"] / m / bw[links["pp"]] if pp > 1 else 0.0,
             "dp": max(t_dp), "offload": max(t_cpu)}
    return Layout(dp, tp, pp, strategy, ckpt, sp, m, worst, *mem[worst],
                  comm={k: max(c[k] for c in comm) for k in ("dp", "tp", "pp", "pcie")}, links=links,
                  bubble=(pp - 1) / (m + pp - 1), compute_s=compute, step_s=step, times=times, host=host[worst])
