"""How a model is laid out over the ranks of a run, and the three things that depend on it: building
the layout (and giving a model built on `meta` its weights there), restoring the optimizer state
from a checkpoint, and writing a checkpoint.

One process trains the model whole; torchrun's ranks replicate it (DDP), shard it (FSDP2), split each
layer (tensor parallel), cut it into stages (pipeline), or compose these on a pp x dp x tp mesh
(runtime/distributed/mesh.py). Whatever the layout, checkpoints keep the single-process layout.
"""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch

from lmspec.runtime.checkpoint import sharded as sharded_store
from lmspec.runtime.checkpoint.store import (
    MODEL_FILE,
    Checkpoint,
    load_sharded_optimizer,
    read_optimizer_by_name,
    save_checkpoint,
)
from lmspec.runtime.distributed.materialise import is_on_meta, materialise_from_file, materialise_initial
from lmspec.runtime.distributed.world import World
from lmspec.runtime.train.config import TrainConfig
from lmspec.runtime.train.steps import autocast, check_pipeline, deferred_sync, training_loss


@dataclass
class Placement:
    """A model laid out over this rank: `module` is what this rank holds and the optimizer steps (the
    whole model, its shards, or its pipeline stage); `forward` computes a batch (DDP's wrapper, or
    the module) and `loss` scores it; `pipe` drives a pipeline's schedule instead."""
    module: torch.nn.Module
    forward: torch.nn.Module
    world: World
    tensor_parallel_plan: object = None
    ddp: object = None
    pipe: object = None
    mesh: object = None
    sharded: bool = False  # FSDP2 over the data-parallel replicas
    loss: object = training_loss

    @property
    def tp(self) -> int:
        return self.tensor_parallel_plan.tp if self.tensor_parallel_plan is not None else 1

    @property
    def replica_mesh(self):
        """The mesh whose "dp" dim averages gradients by hand (model parallel without FSDP), or None."""
        return None if self.sharded else self.mesh

    def deferred_sync(self):
        """The context that keeps a micro-batch's gradients on this rank, None in a world of one."""
        return deferred_sync(self.ddp, self.module, self.sharded)

    def load_optimizer(self, checkpoint: Checkpoint, optimizer: torch.optim.Optimizer) -> None:
        """Restore the optimizer state saved by any layout into this one's."""
        if self.pipe is not None:
            self.pipe.load_optimizer_state(optimizer, read_optimizer_by_name(checkpoint.path, self.pipe.needed_names()))
        elif self.tp > 1:
            sharded_store.load_tensor_parallel_optimizer(checkpoint, optimizer, self.module, self.tensor_parallel_plan)
        elif self.sharded:
            load_sharded_optimizer(checkpoint, optimizer, self.module)
        else:
            checkpoint.load_optimizer(optimizer, self.module)

    def save(self, run_dir: Path, optimizer: torch.optim.Optimizer, step: int, **fields) -> Path | None:
        """Write a checkpoint of the whole model (every rank calls it; collective when the model is
        split). Model parallel: the weights gathered to rank 0, the optimizer state written by every
        rank through torch.distributed.checkpoint, its share, whole and by name. Returns the
        directory on rank 0, None on the others."""
        world = self.world
        if self.pipe is not None:
            return sharded_store.save_pipeline_checkpoint(self.pipe, world, run_dir, optimizer, self.mesh, step=step,
                                                          **fields)
        if self.tp > 1:
            return sharded_store.save_tensor_parallel_checkpoint(
                world, run_dir, step=step, model=self.module, optimizer=optimizer, plan=self.tensor_parallel_plan,
                mesh=self.mesh, **fields)
        if self.sharded:  # every rank takes part: each writes its optimizer shards
            return sharded_store.save_sharded_checkpoint(world, run_dir, step=step, model=self.module,
                                                         optimizer=optimizer, **fields)
        if world.main:
            return save_checkpoint(run_dir, step=step, model=self.module, optimizer=optimizer, **fields)
        return None


def place(model: torch.nn.Module, cfg: TrainConfig, world: World, device: torch.device, *, graph=None,
          checkpoint: Checkpoint | None = None, tensor_parallel_plan=None, pipeline_stages=None,
          checkpointed: tuple[str, ...] = ()) -> Placement:
    """Lay `model` out over the world as cfg and the plans say. A model built on `meta` gets its
    weights once split, each rank only its share, on `device`: from `checkpoint`, else from cfg.seed
    (the same weights whatever the layout). A model with weights gets the checkpoint's, whole, first."""
    tp = tensor_parallel_plan.tp if tensor_parallel_plan is not None else 1
    pp = len(pipeline_stages) if pipeline_stages else 1
    replicas = world.data_parallel(tp, pp)
    on_meta = is_on_meta(model)
    if checkpoint is not None and not on_meta:
        checkpoint.load_model(model)  # whole, before FSDP shards what is there

    def materialise(module: torch.nn.Module, plan=None) -> None:
        """Weights for this rank's part of a model built on meta (its shards, or its stage)."""
        if not on_meta:
            return
        # offloaded FSDP shards live in host memory; buffers (rotary tables) are used on the device
        where = torch.device("cpu") if cfg.cpu_offload else device
        if checkpoint is not None:
            materialise_from_file(module, graph, checkpoint.verified(MODEL_FILE), where, plan, buffer_device=device)
        else:
            materialise_initial(module, graph, cfg.seed, where, plan, buffer_device=device)

    # FSDP2 over the data-parallel replicas: of the whole model, of each one's tp shards (2-D), or of
    # each pipeline stage (and its tp shards: 3-D)
    placed = Placement(model, model, world, tensor_parallel_plan if tp > 1 else None,
                       sharded=cfg.strategy == "fsdp" and replicas.size > 1)
    if tp * pp > 1:  # model parallel, with data-parallel replicas when the world holds several copies
        from lmspec.runtime.distributed.mesh import layout_mesh
        placed.mesh = layout_mesh(world, tp, pp, device.type)
    if pp > 1:
        from lmspec.runtime.distributed.pipeline import build_pipeline
        check_pipeline(cfg, pp)
        placed.pipe = build_pipeline(
            model, graph, pipeline_stages, placed.mesh.get_local_rank("pp"), world,
            n_microbatches=cfg.micro_batches or pp, schedule=cfg.pipeline_schedule, loss_fn=training_loss,
            mesh=placed.mesh, tensor_parallel_plan=placed.tensor_parallel_plan, checkpointed=checkpointed,
            autocast=lambda: autocast(device, cfg.precision), fsdp=placed.sharded, precision=cfg.precision,
            cpu_offload=cfg.cpu_offload, materialise=lambda stage: materialise(stage, tensor_parallel_plan))
        placed.module = placed.forward = placed.pipe.module  # this rank's stage
    elif tp > 1:
        from lmspec.runtime.distributed.tensor_parallel import apply_tensor_parallel
        apply_tensor_parallel(model, tensor_parallel_plan, placed.mesh["tp"])
        if placed.sharded:
            from lmspec.runtime.distributed.fsdp import shard_model
            shard_model(model, cfg.precision, mesh=placed.mesh["dp"], offload=cfg.cpu_offload)
        materialise(model, tensor_parallel_plan)
    elif placed.sharded:
        from lmspec.runtime.distributed.fsdp import data_parallel_mesh, shard_model
        shard_model(model, cfg.precision, mesh=data_parallel_mesh(world, device), offload=cfg.cpu_offload)
        materialise(model)
    else:
        materialise(model)
        if world.size > 1:
            from torch.nn.parallel import DistributedDataParallel
            # It broadcasts rank 0's weights, so every rank starts alike; gradients live in its
            # all-reduce buckets rather than in a second copy (what `lmspec plan` assumes).
            placed.ddp = placed.forward = DistributedDataParallel(
                model, gradient_as_bucket_view=True, device_ids=[device.index] if device.type == "cuda" else None)
    if cfg.compile:
        from lmspec.runtime.train.compilation import compiled
        from lmspec.runtime.train.loss import compiled_next_token_loss
        placed.forward = compiled(placed.forward)
        placed.loss = compiled_next_token_loss()
    return placed
