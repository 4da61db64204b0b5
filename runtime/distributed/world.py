"""Training under torchrun: one process per rank, joined through torch.distributed.

torchrun sets RANK, LOCAL_RANK and WORLD_SIZE; a plain `lmspec train` sees none and is a world of
one, with nothing initialised. Ranks talk over NCCL on GPUs and gloo on CPUs; a rank that
waits longer than LMSPEC_DIST_TIMEOUT seconds for the others (default 300) fails instead of hanging.
"""
from __future__ import annotations

import os
from dataclasses import dataclass
from datetime import timedelta


@dataclass(frozen=True)
class World:
    rank: int = 0
    size: int = 1

    @property
    def main(self) -> bool:
        """Rank 0: the one that prints, logs and writes checkpoints."""
        return self.rank == 0

    def data_parallel(self, tensor_parallel: int = 1, pipeline_parallel: int = 1) -> World:
        """The world of data-parallel replicas when ranks are laid out pp x dp x tp, tp fastest
        (runtime/distributed/mesh.py): every rank of a replica draws the same batches."""
        replicas = self.size // (tensor_parallel * pipeline_parallel)
        return World((self.rank // tensor_parallel) % replicas, replicas)


def world_from_environment() -> World:
    return World(int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1)))


def launched_by_torchrun() -> bool:
    return "TORCHELASTIC_RUN_ID" in os.environ or ("LOCAL_RANK" in os.environ and "MASTER_ADDR" in os.environ)


def join(world: World, device=None) -> str | None:
    """Initialise the process group of a world that torchrun started (even of one rank, so that a
    one-GPU torchrun checks its backend) and return the backend's name; nothing for a plain process.
    NCCL between GPUs (each rank's own, made current by runtime/device.resolve_device), gloo between CPUs."""
    if world.size == 1 and not launched_by_torchrun():
        return None
    import torch.distributed as dist
    timeout = timedelta(seconds=float(os.environ.get("LMSPEC_DIST_TIMEOUT", 300)))
    on_gpu = device is not None and device.type == "cuda"
    backend = "nccl" if on_gpu else "gloo"
    dist.init_process_group(backend, rank=world.rank, world_size=world.size, timeout=timeout,
                            device_id=device if on_gpu else None)
    return backend


def leave(world: World) -> None:
    import torch.distributed as dist
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def exit_rank(world: World, code: int) -> None:
    """End a rank of several at once, skipping the interpreter's teardown: models sharded by FSDP
    still hold their device mesh's gloo groups, and freeing those while the interpreter shuts down
    now and then aborts the process ("terminate called without an active exception", pytorch#179291)
    after the work is done and saved. A world of one returns and exits as usual."""
    if world.size > 1:
        import sys
        sys.stdout.flush()
        sys.stderr.flush()
        os._exit(code)


def mean(world: World, value: float, device=None) -> float:
    """The mean of a number over the ranks (sent from `device`: NCCL moves only GPU tensors)."""
    return means(world, [value], device)[0]


def means(world: World, values: list[float], device=None) -> list[float]:
    """mean() of each number, in one collective."""
    if world.size == 1:
        return list(values)
    import torch
    import torch.distributed as dist
    t = torch.tensor(values, dtype=torch.float64, device=device)
    dist.all_reduce(t)
    return [v / world.size for v in t.tolist()]


def maximum(world: World, value: float, device=None) -> float:
    """The largest of a number over the ranks."""
    if world.size == 1:
        return value
    import torch
    import torch.distributed as dist
    t = torch.tensor([value], dtype=torch.float64, device=device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def barrier(world: World) -> None:
    if world.size > 1:
        import torch.distributed as dist
        dist.barrier()
