"""Pipeline parallelism for lowered models: each rank runs one stage of `pipeline_stages`' cut.

A rank's stage is a copy of the part of the lowered fx graph its blocks (and, on the first and last
stages, the embeddings and the head) emitted, as its own GraphModule over the same op modules, so
its parameter names are the single-process model's (`block.7.attn.qkv.weight`). What crosses a cut
is what later stages read: the residual stream, and the model's inputs when a later op reads them.
Sizes read from the inputs (`tokens.size(1)`) are recomputed where they are needed rather than
sent, since stages only exchange tensors. The `cache` input (the KV cache) is None in training.

torch.distributed.pipelining runs the stages: PipelineStage per rank and ScheduleGPipe or
Schedule1F1B over `n_microbatches` equal slices of the global batch. The loss of each micro-batch
is the training loop's (mean cross-entropy), divided by the micro-batch count, so the gradients are
those one process computes for the mean loss over the same global batch.

A head tied to the embedding lives on two stages (the last keeps a copy under the head's name);
after each step the two copies' gradients are summed over a group of the two ranks, so AdamW moves
them alike and they stay equal. Checkpoints keep the single-process layout: `full_state_dict()`
gathers the canonical weights (a tied weight once, under the name safetensors' save_model keeps)
to rank 0, `save_checkpoint()` has every rank write its share of the optimizer state through
torch.distributed.checkpoint, and `load_full_state_dict()` / `load_optimizer_state()` read such a
state (of any layout) on every rank, each its own stage's.
"""
from __future__ import annotations

import copy
import math
from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.distributed.pipelining import PipelineStage, Schedule1F1B, ScheduleGPipe

from lmspec.compiler.checkpointing import BLOCK_META
from lmspec.compiler.graph import ModelGraph
from lmspec.compiler.pipeline_stages import Stage
from torch.distributed.tensor import DTensor

SCHEDULES = {"gpipe": ScheduleGPipe, "1f1b": Schedule1F1B}


# ---------------------------------------------------------------------------------- cutting the fx graph

def _is_shape_node(node: fx.Node, shape: dict) -> bool:
    """A size read from an input (`tokens.size(1)`), or arithmetic on such sizes: recomputed by
    every stage that needs it instead of being sent."""
    if node.op == "call_method" and node.target == "size":
        return True
    if node.op == "call_function":
        inputs = node.all_input_nodes
        return bool(inputs) and all(shape.get(a, False) for a in inputs)
    return False


def _assign(model: fx.GraphModule, stages: list[Stage]) -> tuple[dict, dict, list, fx.Node | None]:
    """Each fx node's stage (shape nodes: None), whether it is a shape node, the inputs, the cache."""
    of_block = {b: s.index for s in stages for b in s.blocks}
    last = len(stages) - 1
    stage_of: dict[fx.Node, int | None] = {}
    shape: dict[fx.Node, bool] = {}
    inputs, cache = [], None
    seen_block = False
    for node in model.graph.nodes:
        if node.op == "placeholder":
            if node.name == "cache":
                cache = node
            else:
                inputs.append(node)
                stage_of[node] = 0
            continue
        if node.op == "output":
            continue
        shape[node] = _is_shape_node(node, shape)
        block = node.meta.get(BLOCK_META)
        if block is not None:
            if block not in of_block:
                raise ValueError(f"the stage table names no stage for {block}: was it made for another model?")
            seen_block = True
            stage_of[node] = of_block[block]
        else:
            stage_of[node] = last if seen_block else 0
        if shape[node]:
            stage_of[node] = None
    missing = set(of_block) - {n.meta.get(BLOCK_META) for n in model.graph.nodes}
    if missing:
        raise ValueError(f"the stage table names blocks the model does not have: {', '.join(sorted(missing))}")
    return stage_of, shape, inputs, cache


def stage_module(model: fx.GraphModule, stages: list[Stage], index: int) -> fx.GraphModule:
    """The GraphModule of stage `index`: a copy of its part of `model`'s graph, sharing no parameter
    with `model` (a weight tied across stages gets a copy here), with canonical parameter names.
    Stage 0 takes the model's inputs; the others take what the stage before them returns."""
    stage_of, shape, inputs, cache = _assign(model, stages)
    order = {n: i for i, n in enumerate(model.graph.nodes)}
    n_stages = len(stages)

    def needed_by(s: int) -> set[fx.Node]:
        """Values stage `s` reads from elsewhere (through the shape nodes it recomputes)."""
        found: set[fx.Node] = set()
        todo = [n for n, st in stage_of.items() if st == s and n.op != "placeholder"]
        if s == n_stages - 1:
            todo += [a for a in _output_node(model).all_input_nodes]
        seen = set()
        while todo:
            node = todo.pop()
            for a in node.all_input_nodes:
                if a is cache or a in seen:
                    continue
                seen.add(a)
                if shape.get(a):
                    todo.append(a)
                elif stage_of.get(a) != s or a.op == "placeholder":
                    found.add(a)
        return found

    reads = [needed_by(s) for s in range(n_stages)]
    # carried[s]: produced before stage s (or a model input) and read by stage s or later
    carried = [list(inputs)]
    for s in range(1, n_stages):
        values = {v for t in range(s, n_stages) for v in reads[t]
                  if v.op == "placeholder" or (stage_of[v] is not None and stage_of[v] < s)}
        carried.append(sorted(values, key=order.get))
    carried.append(None)

    g = fx.Graph()
    env: dict[fx.Node, fx.Node] = {}
    for v in carried[index]:
        env[v] = g.placeholder(v.name)

    def arg(a: fx.Node):
        return None if a is cache else env[a]

    def emit(node: fx.Node) -> None:
        if node in env:
            return
        for a in node.all_input_nodes:
            if a is not cache and a not in env:
                emit(a)  # a shape node this stage recomputes
        env[node] = g.node_copy(node, arg)

    for node in model.graph.nodes:
        if stage_of.get(node) == index and node.op != "placeholder":
            emit(node)
    if index == n_stages - 1:
        out = _output_node(model)
        g.output(fx.node.map_arg(out.args[0], arg))
    else:
        results = []
        for v in carried[index + 1]:
            value = env[v]
            if v.op != "placeholder" and v in carried[index]:
                # an activation handed on unchanged: returned as a new autograd node (a view), not as
                # the very tensor received, so that its gradient flows back like any other output's
                value = g.call_method("view_as", (value, value))
            results.append(value)
        g.output(results[0] if len(results) == 1 else tuple(results))
    g.lint()
    module = fx.GraphModule(model, g, class_name=f"{type(model).__name__}Stage{index}")
    return copy.deepcopy(module)


def _output_node(model: fx.GraphModule) -> fx.Node:
    return next(n for n in reversed(model.graph.nodes) if n.op == "output")


# ------------------------------------------------------------------------------------------- running

@dataclass
class _Tie:
    name: str  # the copy's or the owner's name on this rank
    group: object  # the process group of the ranks that hold the weight


@dataclass
class Pipeline:
    module: fx.GraphModule  # this rank's stage
    stage: Stage
    stages: list[Stage]
    graph: ModelGraph
    rank: int
    world: int
    n_microbatches: int
    schedule_name: str
    group: object = None
    loss_fn: object = None
    _schedule: object = None
    _pipe_stage: object = None
    mesh: object = None  # the pp x dp x tp mesh, when built on one
    _ties: list[_Tie] = field(default_factory=list)
    _scale: float = 1.0
    _unscaled: dict = field(default_factory=dict)

    @property
    def is_first(self) -> bool:
        return self.stage.index == 0

    @property
    def is_last(self) -> bool:
        return self.stage.index == len(self.stages) - 1

    @property
    def device(self) -> torch.device:
        return next(self.module.parameters()).device

    def _rank_of(self, stage_index: int) -> int:
        return dist.get_global_rank(self.group, stage_index) if self.group is not None else stage_index

    def parameters(self):
        return self.module.parameters()

    def named_parameters(self):
        return self.module.named_parameters()

    def train(self, mode: bool = True):
        self.module.train(mode)
        return self

    def eval(self):
        return self.train(False)

    def _loss(self, output, target):
        if isinstance(output, (tuple, list)):
            output = output[0]
        loss = self.loss_fn(output, target)
        scaled = loss * (self._scale / self.n_microbatches)
        # the schedule may call this once more to learn shapes; only its per-micro-batch list counts
        self._unscaled[id(scaled)] = loss.detach()
        return scaled

    def _feeds(self, tokens: torch.Tensor, targets: torch.Tensor) -> tuple[tuple, torch.Tensor | None]:
        """The schedule's inputs on this stage: the tokens on the first, the targets on the last.
        Contiguous, as torch's stages check each micro-batch's strides (torch 2.11 refuses the
        [:, :-1] view of a batch that the sequences and their targets were cut from)."""
        args = (tokens.to(self.device).contiguous(),) if self.is_first else ()
        return args, targets.to(self.device).contiguous() if self.is_last else None

    def _check_batch(self, tokens: torch.Tensor) -> None:
        if tokens.size(0) % self.n_microbatches:
            raise ValueError(f"a batch of {tokens.size(0)} sequences does not split into "
                             f"{self.n_microbatches} equal micro-batches")

    def step(self, tokens: torch.Tensor, targets: torch.Tensor, scale: float = 1.0) -> float:
        """Forward and backward over the global batch (every rank passes the same one), in
        `n_microbatches` micro-batches; gradients accumulate into `.grad` (of `scale` x the mean
        loss: pass 1/grad_accum when calling it grad_accum times per optimizer step). Returns the
        mean loss over the batch, on every rank."""
        if scale <= 0:
            raise ValueError(f"the loss scale must be positive, not {scale}")
        self._check_batch(tokens)
        self._scale = scale
        args, target = self._feeds(tokens, targets)
        losses: list = []
        # a tied weight's copies sum this step's gradients only, not what earlier steps accumulated
        earlier = [self._tied_param(tie).grad for tie in self._ties]
        for tie in self._ties:
            self._tied_param(tie).grad = None
        self._schedule.step(*args, target=target, losses=losses, return_outputs=False)
        self._sync_tied_grads(earlier)
        return self._broadcast_loss(losses)

    @torch.no_grad()
    def eval_loss(self, tokens: torch.Tensor, targets: torch.Tensor) -> float:
        """The mean loss over a batch, forward only; every rank calls it and gets the number."""
        self._check_batch(tokens)
        self._scale = 1.0
        args, target = self._feeds(tokens, targets)
        losses: list = []
        self._schedule.eval(*args, target=target, losses=losses)
        return self._broadcast_loss(losses)

    def _broadcast_loss(self, losses: list) -> float:
        value = torch.zeros(1, dtype=torch.float64, device=self.device)
        if self.is_last:
            value[0] = torch.stack([self._unscaled[id(l)].double() for l in losses]).mean()
        self._unscaled.clear()
        if len(self.stages) > 1:
            dist.broadcast(value, src=self._rank_of(len(self.stages) - 1), group=self.group)
        return float(value)

    def _tied_param(self, tie: _Tie) -> torch.nn.Parameter:
        return self.module.get_parameter(tie.name)

    def _sync_tied_grads(self, earlier: list) -> None:
        for tie, before in zip(self._ties, earlier):
            p = self._tied_param(tie)
            if p.grad is None:
                p.grad = torch.zeros_like(p)
            if isinstance(p, DTensor) and p.grad.placements != p.placements:
                # the vocab-parallel embedding's gradient comes back Replicate; its copy's is Shard(0)
                p.grad = p.grad.redistribute(p.device_mesh, p.placements)
            dist.all_reduce(_local(p.grad), group=tie.group)
            if before is not None:
                p.grad += before

    def _owned(self):
        """This rank's parameters, a tied copy left out (its owner counts it)."""
        return [p for name, p in self.module.named_parameters() if name not in self.stage.tied_copies]

    def clip_grad_norm_(self, max_norm: float) -> float:
        """Clip the gradients by their norm over the whole model (a tied weight counted once), like
        torch.nn.utils.clip_grad_norm_ in one process; returns the norm before clipping."""
        grads = [p.grad for p in self._owned() if p.grad is not None]
        sq = torch.zeros(1, dtype=torch.float64, device=self.device)
        for g in grads:
            part = g.detach().double().pow(2).sum()  # under tensor parallelism, summed over the shards
            sq += part.full_tensor() if isinstance(part, DTensor) else part
        if len(self.stages) > 1:
            dist.all_reduce(sq, group=self.group)
        norm = math.sqrt(float(sq))
        coef = max_norm / (norm + 1e-6)
        if coef < 1:
            for p in self.module.parameters():
                if p.grad is not None:
                    p.grad.mul_(coef)
        return norm

    # ---- checkpoints in the single-process layout ----------------------------------------------
    def _kept_name(self, name: str) -> str:
        """The name a single-process save_model keeps for a (possibly tied) weight."""
        return sorted(self._aliases(name))[0]

    def _aliases(self, name: str) -> list[str]:
        params = self.graph.params
        owner = params[name].tied_to if name in params and params[name].tied_to else name
        return [owner] + [n for n, p in params.items() if p.tied_to == owner]

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """The whole model's weights on rank 0's CPU, keyed as the single-process model.safetensors
        is (a tied weight once); an empty dict on the other ranks. Collective."""
        mine = {}
        for name, tensor in self._canonical_state().items():
            if name in self.stage.tied_copies:
                continue  # the owner's stage sends it
            mine[self._kept_name(name)] = tensor
        if self._peer_index:
            return {}  # the first of the ranks that hold this stage sends it
        if len(self.stages) == 1:
            return {k: v.detach().cpu().clone() for k, v in mine.items()}
        metas = [None] * len(self.stages)
        dist.all_gather_object(metas, {k: (tuple(v.shape), str(v.dtype)) for k, v in mine.items()}, group=self.group)
        out = {}
        if self.is_first:
            out.update({k: v.detach().cpu().clone() for k, v in mine.items()})
        for s in range(1, len(self.stages)):
            for key in sorted(metas[s]):
                shape, dtype = metas[s][key]
                if self.stage.index == s:
                    dist.send(mine[key].detach().to(self.device).contiguous(), dst=self._rank_of(0), group=self.group)
                elif self.is_first:
                    buf = torch.empty(shape, dtype=getattr(torch, dtype.split(".")[-1]), device=self.device)
                    dist.recv(buf, src=self._rank_of(s), group=self.group)
                    out[key] = buf.cpu()
        return out

    @property
    def _tp(self):
        """The tensor-parallel plan this stage runs under, or None."""
        return getattr(self.module, "tensor_parallel", None)

    @property
    def _peer_index(self) -> int:
        """This rank's place among the ranks that hold the same stage (0: the one that reports)."""
        from lmspec.runtime.distributed.mesh import stage_peers
        return stage_peers(self.mesh)[1]

    def _canonical_state(self) -> dict[str, torch.Tensor]:
        """This stage's state_dict, whole and in the single-process layout (collective over the
        ranks that split or shard the stage, when they do; plain tensors pass through)."""
        from lmspec.runtime.distributed.canonical_state import full_state_dict
        return full_state_dict(self.module, self._tp)

    @torch.no_grad()
    def load_full_state_dict(self, state: dict[str, torch.Tensor]) -> None:
        """Copy a whole-model state (as model.safetensors holds it, a tied weight under any of its
        names) into this rank's stage."""
        mine = {}
        for name, tensor in self.module.state_dict().items():
            source = next((state[a] for a in [name, *self._aliases(name)] if a in state), None)
            if source is None:
                raise KeyError(f"the weights hold no {name}")
            if tuple(source.shape) != tuple(tensor.shape):
                raise ValueError(f"{name}: the weights hold shape {tuple(source.shape)}, "
                                 f"the model {tuple(tensor.shape)}")
            mine[name] = source
        from lmspec.runtime.distributed.canonical_state import load_full_state_dict
        load_full_state_dict(self.module, self._tp, mine)  # each rank keeps its split or shards, if any

    def needed_names(self) -> set[str]:
        """The names under which a whole-model state may hold this stage's parameters."""
        return {a for name, _ in self.module.named_parameters() for a in [name, *self._aliases(name)]}

    @torch.no_grad()
    def load_optimizer_state(self, optimizer: torch.optim.Optimizer, by_name: dict) -> None:
        """Give this rank's optimizer its parameters' state from a whole-model state keyed by name
        (read_optimizer_by_name); a tied copy takes its owner's state, under whichever of its names
        the state was saved."""
        mine = {}
        for name, p in self.module.named_parameters():
            source = next((by_name["state"][a] for a in [name, *self._aliases(name)] if a in by_name["state"]), None)
            if source is None:
                raise KeyError(f"the optimizer state holds nothing for {name}")
            mine[name] = source
        from lmspec.runtime.distributed.canonical_state import load_full_optimizer_state_dict
        names = {id(p): n for n, p in self.module.named_parameters()}
        groups = [{**saved, "params": [names[id(p)] for p in g["params"]]}
                  for saved, g in zip(by_name["param_groups"], optimizer.param_groups)]
        load_full_optimizer_state_dict(self.module, optimizer, self._tp, {"state": mine, "param_groups": groups})


def _run_forward_in(module: torch.nn.Module, context) -> None:
    """Make `module(...)` run its forward inside `context()` (autocast): PipelineStage calls the
    module itself, so the context has to travel with it."""
    forward = module.forward

    def forward_in_context(*args, **kwargs):
        with context():
            return forward(*args, **kwargs)

    module.forward = forward_in_context


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def build_pipeline(model: fx.GraphModule, graph: ModelGraph, stages: list[Stage], rank: int, world,
                   n_microbatches: int, schedule: str = "1f1b", loss_fn=None, group=None, mesh=None,
                   tensor_parallel_plan=None, checkpointed=(), autocast=None, fsdp: bool = False,
                   precision: str = "fp32", cpu_offload: bool = False, materialise=None) -> Pipeline:
    """This rank's stage of `model` (one stage per rank: len(stages) ranks in `group`, default the
    world) and its schedule. Collective when a tied weight crosses stages (it makes the process
    group that sums the copies' gradients), so every rank calls it at the same point.

    With a pp x dp x tp `mesh` (runtime/distributed/mesh.py) the stages run over its "pp" groups, and
    with a `tensor_parallel_plan` each stage is split over its "tp" group as well. `checkpointed`:
    blocks whose activations are recomputed in the backward pass (those of this stage are rewritten
    in its own graph, compiler/checkpointing.py); `autocast`: a context (mixed precision) the
    stage's forward runs in; `fsdp`: the stage is sharded over the mesh's "dp" group with FSDP2
    (at `precision`, optionally offloaded to the CPU), which the schedule drives (it defers the
    reduce-scatter to the last micro-batch). `materialise(stage)`: gives a stage cut from a model built on
    `meta` its weights, once split and sharded (runtime/distributed/materialise.py), before the schedule sees it."""
    size = getattr(world, "size", world)
    if mesh is not None:
        group = mesh["pp"].get_group()
    if group is not None:
        size, rank = dist.get_world_size(group), dist.get_rank(group)
    if len(stages) != size:
        raise ValueError(f"{len(stages)} pipeline stages need {len(stages)} ranks, not {size}")
    if schedule not in SCHEDULES:
        raise ValueError(f"unknown pipeline schedule {schedule!r}: choose {' or '.join(SCHEDULES)}")
    if n_microbatches < 1 or (schedule == "1f1b" and n_microbatches < len(stages)):
        raise ValueError(f"the {schedule} schedule needs at least {len(stages) if schedule == '1f1b' else 1} "
                         f"micro-batches per step, not {n_microbatches}")
    if loss_fn is None:
        import torch.nn.functional as F

        def loss_fn(logits, targets):
            return F.cross_entropy(logits.reshape(-1, logits.size(-1)).float(), targets.reshape(-1))

    stage = stages[rank]
    module = stage_module(model, stages, rank)
    module.train(model.training)
    mine = [b for b in stage.blocks if b in set(checkpointed)]
    if mine:
        from lmspec.compiler.checkpointing import checkpoint_blocks
        checkpoint_blocks(module, ",".join(mine))
    if tensor_parallel_plan is not None:
        from lmspec.runtime.distributed.tensor_parallel import apply_tensor_parallel
        apply_tensor_parallel(module, tensor_parallel_plan, mesh["tp"], stage=True)
    if fsdp:
        from lmspec.runtime.distributed.fsdp import shard_model
        shard_model(module, precision, mesh=mesh["dp"], offload=cpu_offload)
    if materialise is not None:
        materialise(module)
    if autocast is not None:
        _run_forward_in(module, autocast)
    pipe = Pipeline(module=module, stage=stage, stages=stages, graph=graph, rank=rank, world=size,
                    n_microbatches=n_microbatches, schedule_name=schedule, group=group, loss_fn=loss_fn, mesh=mesh)
    # ties across stages: one group per tied weight, made by every rank in the same order
    # (under a mesh, one group per data- and tensor-parallel coordinate: the copies of one shard)
    owner_stage = {name: s.index for s in stages for name in s.parameters}
    grid = mesh.mesh if mesh is not None else None
    mine = tuple(mesh.get_local_rank(d) for d in ("dp", "tp")) if mesh is not None else ()
    places = [(d, t) for d in range(grid.size(1)) for t in range(grid.size(2))] if grid is not None else [()]
    for s in stages:
        for name, target in sorted(s.tied_copies.items()):
            for place in places:
                if grid is not None:
                    members = sorted({int(grid[(owner_stage[target], *place)]), int(grid[(s.index, *place)])})
                else:
                    members = sorted({pipe._rank_of(owner_stage[target]), pipe._rank_of(s.index)})
                tie_group = dist.new_group(members) if size > 1 else None
                if place != mine:
                    continue
                if stage.index == s.index:
                    pipe._ties.append(_Tie(name, tie_group))
                elif stage.index == owner_stage[target]:
                    pipe._ties.append(_Tie(target, tie_group))
    device = pipe.device
    pipe._pipe_stage = PipelineStage(module, rank, len(stages), device, group=group)
    pipe._schedule = SCHEDULES[schedule](pipe._pipe_stage, n_microbatches, loss_fn=pipe._loss, scale_grads=False)
    return pipe
