"""The device mesh of a run that composes data, tensor and pipeline parallelism.

Ranks are laid out pp x dp x tp with tp fastest (Megatron's order, and `lmspec plan`'s): a tensor-
parallel group is consecutive ranks (one node's NVLink), data-parallel replicas come next, pipeline
stages last. A rank's coordinates are those of the 3-D `DeviceMesh` ("pp", "dp", "tp"); its 1-D
sub-meshes give the groups each kind of parallelism talks over, so no group is made by hand.

Data parallelism over model-parallel replicas: every replica draws its own batches, and after the
backward pass each gradient (for a DTensor, its local shard: replicas hold the same shards) is
averaged over the dp group in buckets, as DDP would, or the replicas shard the state with FSDP2 over the dp
sub-mesh (`fully_shard(..., mesh=mesh["dp"])`, the 2-D FSDP x TP that DTensor supports).
"""
from __future__ import annotations

import logging

import torch
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor

from lmspec.runtime.distributed.collectives import all_reduce_in_buckets
from lmspec.runtime.distributed.world import World

MESH_DIMS = ("pp", "dp", "tp")


def layout_mesh(world: World, tp: int, pp: int, device_type: str | None = None) -> DeviceMesh:
    """The pp x dp x tp mesh of the whole world (dp = world / (tp x pp)); the process group must exist."""
    if world.size % (tp * pp):
        raise ValueError(f"{tp} x {pp} model-parallel ranks do not divide a world of {world.size}")
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(device_type, (pp, world.size // (tp * pp), tp), mesh_dim_names=MESH_DIMS)


def coordinates(mesh: DeviceMesh) -> dict[str, int]:
    """This rank's place on each dim: {"pp": stage, "dp": replica, "tp": shard}."""
    return {name: mesh.get_local_rank(name) for name in MESH_DIMS}


def stage_peers(mesh: DeviceMesh | None) -> tuple[int, int]:
    """How many ranks hold the same pipeline stage (its dp x tp ranks), and this rank's index among
    them: a model-parallel checkpoint gives each parameter's state to one of them to write."""
    if mesh is None:
        return 1, 0
    tp = mesh["tp"].size()
    return mesh["dp"].size() * tp, mesh.get_local_rank("dp") * tp + mesh.get_local_rank("tp")


def average_gradients(parameters, mesh: DeviceMesh | None) -> None:
    """Average each gradient over the data-parallel replicas of a model-parallel run (a no-op
    without replicas), a bucket of gradients per all-reduce, as DDP does."""
    if mesh is None or mesh["dp"].size() == 1:
        return
    grads = [p.grad.to_local() if isinstance(p.grad, DTensor) else p.grad for p in parameters if p.grad is not None]
    all_reduce_in_buckets(grads, mesh["dp"].get_group(), divide_by=mesh["dp"].size())


# DTensor logs a note each time it redistributes over two mesh dims in two collectives (the clip's
# norm, a checkpoint's gather under FSDP x TP): expected here, and not the user's to act on.
logging.getLogger("torch.distributed.tensor._redistribute").setLevel(logging.ERROR)
