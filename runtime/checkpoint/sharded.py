"""Checkpoints of runs of several ranks (FSDP, tensor, pipeline, and their data-parallel replicas):
every rank calls the save, the AdamW state is written through torch.distributed.checkpoint by every
rank, each its own share, in a layout that any other layout reads; and resuming a tensor-parallel
run's optimizer from any checkpoint.

  model.safetensors   the consolidated weights (gathered to rank 0, as an FSDP run's are)
  optimizer.dcp/      {"optimizer": {"state": {name: {step, exp_avg, exp_avg_sq}}, "param_groups": [...]}}
                      keyed by the single-process parameter names with whole, canonical tensors (a
                      tensor-parallel shard un-permuted and gathered), the same keys an FSDP run's
                      get_optimizer_state_dict writes. Each parameter is written by one rank: the
                      ranks that hold a pipeline stage (its dp x tp ranks) take its parameters in turn.

So an FSDP run (dcp.load reshards the whole tensors into its shards), one process, or a tensor or
pipeline run of any shape reads it; store.read_optimizer_dcp_by_name reads just the parameters a rank
needs (a pipeline stage's), never the whole state on one rank.
"""
from __future__ import annotations

from pathlib import Path

import torch
import torch.distributed.checkpoint as dcp
from torch import nn
from torch.distributed.checkpoint.state_dict import get_optimizer_state_dict
from torch.distributed.device_mesh import DeviceMesh
from torch.distributed.tensor import DTensor

from lmspec.compiler.tensor_parallel import TensorParallelPlan
from lmspec.runtime.atomic import TMP_PREFIX
from lmspec.runtime.checkpoint.store import (
    CHECKPOINTS_DIR,
    OPTIMIZER_DCP_DIR,
    Checkpoint,
    read_optimizer_by_name,
    remove_stale_temporaries,
    save_checkpoint,
    step_dir_name,
)
from lmspec.runtime.distributed.canonical_state import (
    full_state_dict,
    load_full_optimizer_state_dict,
    owned_optimizer_state,
    param_groups_by_name,
    plan_of,
)
from lmspec.runtime.distributed.fsdp import consolidated_weights
from lmspec.runtime.distributed.world import World, barrier


def save_model_parallel_checkpoint(world: World, run_dir, *, step: int, weights: dict[str, torch.Tensor],
                                   state: dict[str, dict], param_groups: list[dict], **fields) -> Path | None:
    """Every rank calls it with its share of the optimizer `state` (owned_optimizer_state) and the
    whole model's `param_groups`; rank 0 passes the consolidated `weights`. Returns the directory
    on rank 0, None elsewhere."""
    return save_with_optimizer_dcp(world, run_dir, step=step, weights=lambda: weights,
                                   optimizer_state={"state": state, "param_groups": param_groups}, **fields)


def save_with_optimizer_dcp(world: World, run_dir, *, step: int, optimizer_state: dict, weights, **fields
                            ) -> Path | None:
    """A checkpoint whose optimizer state every rank writes through dcp.save into a staging
    directory; rank 0 then writes `weights()` (called on every rank, after the save: it may be
    collective) and the rest through save_checkpoint, which moves the staged state in before the
    atomic rename. Returns the directory on rank 0, None elsewhere."""
    parent = Path(run_dir) / CHECKPOINTS_DIR
    staging = parent / f"{TMP_PREFIX}dcp-{step_dir_name(step)}"  # the same name on every rank
    if world.main:
        parent.mkdir(parents=True, exist_ok=True)
        remove_stale_temporaries(parent)
        staging.mkdir()
    barrier(world)
    dcp.save({"optimizer": optimizer_state}, checkpoint_id=str(staging))
    whole = weights()
    path = None
    if world.main:
        path = save_checkpoint(run_dir, step=step, model=None, weights=whole, optimizer=None,
                               move_in={OPTIMIZER_DCP_DIR: staging}, **fields)
    barrier(world)
    return path


def save_sharded_checkpoint(world: World, run_dir, *, step: int, model, optimizer, **fields) -> Path | None:
    """A checkpoint of an FSDP run; every rank calls it. The ranks write their optimizer shards
    through torch.distributed.checkpoint; rank 0 writes the consolidated weights and the rest
    (parallel_checkpoint.save_with_optimizer_dcp). Returns the checkpoint directory on rank 0,
    None on the others."""
    return save_with_optimizer_dcp(world, run_dir, step=step, optimizer_state=get_optimizer_state_dict(model, optimizer),
                                   weights=lambda: consolidated_weights(model), **fields)


def save_tensor_parallel_checkpoint(world: World, run_dir, *, step: int, model: nn.Module,
                                    optimizer: torch.optim.Optimizer, plan: TensorParallelPlan | None = None,
                                    mesh: DeviceMesh | None = None, **fields) -> Path | None:
    """A checkpoint of a tensor-parallel run (and its data-parallel replicas, `mesh`): the whole
    weights in model.safetensors (tied ones once) written by rank 0, the AdamW state through
    torch.distributed.checkpoint, each rank writing its share whole and un-permuted
    (runtime/checkpoint/sharded.py), so any layout resumes it. Every rank calls it (the gathers
    are collective). `fields` are save_checkpoint's rng, train_config, metrics, tokenizer, spec,
    keep. Returns the directory on rank 0, None on the others."""
    from lmspec.runtime.distributed.mesh import stage_peers
    from lmspec.runtime.distributed.fsdp import kept_names
    plan = plan_of(model, plan)
    weights = full_state_dict(model, plan)
    weights = {n: weights[n].contiguous() for n in kept_names(model) if n in weights} if world.main else {}
    peers, index = stage_peers(mesh) if mesh is not None else (plan.tp, _mesh_rank(model))
    state = owned_optimizer_state(model, optimizer, plan=plan, peers=peers, index=index)
    return save_model_parallel_checkpoint(world, run_dir, step=step, weights=weights, state=state,
                                          param_groups=param_groups_by_name(model, optimizer), **fields)


def _mesh_rank(model: nn.Module) -> int:
    mesh = next(p.device_mesh for p in model.parameters() if isinstance(p, DTensor))
    return mesh.get_local_rank()


def load_tensor_parallel_optimizer(checkpoint: Checkpoint, optimizer: torch.optim.Optimizer, model: nn.Module,
                                   plan: TensorParallelPlan | None = None) -> None:
    """Resume the optimizer of a tensor-parallel run from any checkpoint (one process, DDP, FSDP,
    tensor or pipeline parallel of any size)."""
    load_full_optimizer_state_dict(model, optimizer, plan, read_optimizer_by_name(checkpoint.path))


def save_pipeline_checkpoint(pipe, world, run_dir, optimizer: torch.optim.Optimizer, mesh=None, *, step: int,
                             **fields):
    """A checkpoint of the whole model; every rank calls it. The weights are gathered to rank 0
    (model.safetensors); each rank writes its share of the AdamW state, whole and by name,
    through torch.distributed.checkpoint (runtime/checkpoint/sharded.py). A tied weight's copy
    is left out: its owner holds the same state. Returns the directory on rank 0."""
    from lmspec.runtime.distributed.mesh import stage_peers
    weights = pipe.full_state_dict()
    peers, index = stage_peers(mesh)
    skip = set(pipe.stage.tied_copies)
    state = owned_optimizer_state(pipe.module, optimizer, plan=pipe._tp, skip=skip, peers=peers, index=index)
    groups = param_groups_by_name(pipe.module, optimizer, skip, group=pipe.group, stages=len(pipe.stages))
    return save_model_parallel_checkpoint(world, run_dir, step=step, weights=weights, state=state,
                                          param_groups=groups, **fields)
