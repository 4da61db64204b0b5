"""Checkpoints of model-parallel runs (tensor, pipeline, and their data-parallel replicas): the
AdamW state written through torch.distributed.checkpoint by every rank, each its own share, in a
layout that any other layout reads.

  model.safetensors   the consolidated weights (gathered to rank 0, as an FSDP run's are)
  optimizer.dcp/      {"optimizer": {"state": {name: {step, exp_avg, exp_avg_sq}}, "param_groups": [...]}}
                      keyed by the single-process parameter names with whole, canonical tensors (a
                      tensor-parallel shard un-permuted and gathered), the same keys an FSDP run's
                      get_optimizer_state_dict writes. Each parameter is written by one rank: the
                      ranks that hold a pipeline stage (its dp x tp ranks) take its parameters in turn.

So an FSDP run (dcp.load reshards the whole tensors into its shards), one process, or a tensor or
pipeline run of any shape reads it; `read_optimizer_dcp_by_name` reads just the parameters a rank
needs (a pipeline stage's), never the whole state on one rank.
"""
from __future__ import annotations

import warnings
from pathlib import Path

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint import FileSystemReader
from torch.distributed.checkpoint.api import CheckpointException

from lmspec.runtime.checkpoint.store import (
    CHECKPOINTS_DIR,
    OPTIMIZER_DCP_DIR,
    TMP_PREFIX,
    CheckpointError,
    remove_stale_temporaries,
    save_checkpoint,
    step_dir_name,
)
from lmspec.runtime.distributed.world import World, barrier

# dcp.load(no_dist=True) says it reads in one process, which is what it is asked to do
warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")


def owned_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, *, plan=None,
                          skip=frozenset(), peers: int = 1, index: int = 0) -> dict[str, dict]:
    """This rank's share of the optimizer state by name: parameter i of the module (those in `skip`,
    a tied copy, left out) when i % peers == index. Every peer calls it (the gathers are collective)."""
    from lmspec.runtime.distributed.canonical_state import canonical_optimizer_state
    names = {id(p): n for n, p in module.named_parameters()}
    state, i = {}, 0
    for group in optimizer.param_groups:
        for p in group["params"]:
            name = names[id(p)]
            if name in skip or p not in optimizer.state:
                continue
            whole = canonical_optimizer_state(name, optimizer.state[p], plan)  # every peer takes part
            if i % peers == index:
                state[name] = whole
            i += 1
    return state


def param_groups_by_name(module: torch.nn.Module, optimizer: torch.optim.Optimizer, skip=frozenset(),
                         group=None, stages: int = 1) -> list[dict]:
    """The optimizer's groups with each "params" the whole model's names, in order: a pipeline's
    stages (`group`, `stages` of them) contribute theirs in stage order. Collective over `group`."""
    names = {id(p): n for n, p in module.named_parameters()}
    mine = [{**{k: v for k, v in g.items() if k != "params"},
             "params": [names[id(p)] for p in g["params"] if names[id(p)] not in skip]} for g in optimizer.param_groups]
    if stages == 1:
        return mine
    everyone = [None] * stages
    dist.all_gather_object(everyone, mine, group=group)
    merged = [dict(g, params=[]) for g in mine]
    for part in everyone:
        for into, g in zip(merged, part):
            into["params"] += g["params"]
    return merged


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

def read_optimizer_dcp_by_name(directory: Path, names=None) -> dict:
    """optimizer.dcp (written by an FSDP or a model-parallel run) as read_optimizer_by_name's form:
    {"state": {name: {...}}, "param_groups": [...]}, whole tensors on the CPU, only for `names`
    when given (every parameter otherwise). Read by this process alone, with no collective."""
    directory = Path(directory)
    try:
        metadata = FileSystemReader(str(directory)).read_metadata()
        paths = metadata.planner_data
        template: dict = {"optimizer": {"state": {}, "param_groups": []}}
        for key, meta in metadata.state_dict_metadata.items():
            path = paths[key]
            if path[:2] == ("optimizer", "state") and len(path) == 4:
                if names is None or path[2] in names:
                    template["optimizer"]["state"].setdefault(path[2], {})[path[3]] = torch.empty(
                        meta.size, dtype=meta.properties.dtype)
            elif path[:2] == ("optimizer", "param_groups") and len(path) == 4:
                groups = template["optimizer"]["param_groups"]
                while len(groups) <= path[2]:
                    groups.append({})
                groups[path[2]][path[3]] = ""  # a placeholder dcp.load replaces with the saved value
        dcp.load(template, checkpoint_id=str(directory), no_dist=True)
    except CheckpointException as err:
        causes = "; ".join(f"{type(f[0] if isinstance(f, tuple) else f).__name__}" for f in err.failures.values())
        raise CheckpointError(f"{directory}: corrupt or incomplete ({causes})") from None
    except (RuntimeError, ValueError, KeyError, OSError, AttributeError) as err:
        raise CheckpointError(f"{directory}: corrupt or unreadable ({type(err).__name__}: {err})") from None
    groups = [{k: tuple(v) if isinstance(v, list) and k != "params" else v for k, v in g.items()}
              for g in template["optimizer"]["param_groups"]]
    return {"state": template["optimizer"]["state"], "param_groups": groups}
