"""FSDP2 for lowered models: `fully_shard` per block, and the state of a sharded run in checkpoints.

A lowered model is a torch.fx GraphModule whose code calls the op modules (`block.3.attn`,
`block.3.mlp`) directly and never `block.3` itself, so hooks on `block.3` would never fire. Each
block's unit is therefore the list of op modules its fx nodes call, sharded together as one FSDP
group (one all-gather per block); everything outside the blocks (embeddings, final norm, a tied
head) belongs to the root. That is the layout `lmspec plan` assumes.

Checkpoints of a sharded run keep the usual layout, so sampling, export and resuming on any number
of ranks read them as they read any other:
  model.safetensors   the consolidated weights, gathered to rank 0 and written by it
  optimizer.dcp/      the AdamW state as torch.distributed.checkpoint wrote it, each rank its shards;
                      dcp.load reshards it for whatever layout loads it (N ranks -> M ranks, or one)
"""
from __future__ import annotations

import contextlib
import warnings

import torch
import torch.distributed as dist
import torch.fx as fx
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
from torch.distributed.fsdp import CPUOffloadPolicy, MixedPrecisionPolicy, OffloadPolicy, fully_shard

from lmspec.compiler.checkpointing import BLOCK_META
from lmspec.runtime.distributed.world import World

STRATEGIES = ("ddp", "fsdp")
_LOW = {"bf16": torch.bfloat16, "fp16": torch.float16}

# A lowered graph adds op outputs out of place (`x = x + attn(...)`), never in place, so the hooks
# this warning is about are never dropped.
warnings.filterwarnings("ignore", message=r"FSDP2-wrapped module .* returned a view tensor")
warnings.filterwarnings("ignore", message=r"torch\.distributed is disabled, unavailable or uninitialized")


def block_units(model: fx.GraphModule) -> dict[str, list[str]]:
    """For each block (`block.0`, …), the names of the modules with parameters its fx nodes call.
    A module whose parameter is shared with a module outside it stays with the root: one parameter
    can belong to only one FSDP group."""
    owners: dict[int, set[str]] = {}
    for name, module in model.named_modules():
        for p in module.parameters(recurse=False):
            owners.setdefault(id(p), set()).add(name)
    units: dict[str, list[str]] = {}
    for node in model.graph.nodes:
        block = node.meta.get(BLOCK_META)
        if node.op != "call_module" or not block:
            continue
        module = model.get_submodule(node.target)
        params = list(module.parameters())
        inside = {name for name, _ in module.named_modules(prefix=node.target)}
        if params and all(owners[id(p)] <= inside for p in params):
            names = units.setdefault(block, [])
            if node.target not in names:
                names.append(node.target)
    return units


def shard_model(model: fx.GraphModule, precision: str = "fp32", mesh=None, offload: bool = False
                ) -> dict[str, list[str]]:
    """Apply FSDP2 in place: one `fully_shard` group per block, then the root. Under mixed
    precision the weights are gathered in 16 bits and gradients reduced in fp32. `mesh`: the
    data-parallel sub-mesh of a tensor-parallel run (2-D FSDP x TP); default the whole world.
    `offload`: the shards (weights, gradients, so AdamW's state too) live in host memory, copied
    to the device for each all-gather (CPUOffloadPolicy); the optimizer steps on the CPU.
    Returns the units."""
    policy = MixedPrecisionPolicy(param_dtype=_LOW.get(precision), reduce_dtype=torch.float32
                                  if precision in _LOW else None)
    on_gpu = (mesh.device_type if mesh is not None else "cuda" if torch.cuda.is_available() else "cpu") == "cuda"
    offload_policy = CPUOffloadPolicy(pin_memory=on_gpu) if offload else OffloadPolicy()
    units = block_units(model)
    for names in units.values():
        fully_shard([model.get_submodule(n) for n in names], mesh=mesh, mp_policy=policy, offload_policy=offload_policy)
    fully_shard(model, mesh=mesh, mp_policy=policy, offload_policy=offload_policy)
    return units


def data_parallel_mesh(world: World, device: torch.device):
    """The 1-D mesh of every rank, on the run's device type (not whatever accelerator is present:
    `--device cpu` on a GPU machine shards over gloo)."""
    from torch.distributed.device_mesh import init_device_mesh
    return init_device_mesh(device.type, (world.size,))


@contextlib.contextmanager
def no_gradient_sync(model: torch.nn.Module):
    """Accumulate gradients locally; the micro-batch after this reduce-scatters them all at once."""
    model.set_requires_gradient_sync(False)
    try:
        yield
    finally:
        model.set_requires_gradient_sync(True)


def agree_on_overflow(scaler: torch.amp.GradScaler, optimizer: torch.optim.Optimizer) -> None:
    """fp16: each rank checked only its own gradient shards for inf/NaN after unscale_; every rank
    must skip the step if any shard overflowed, or their weights part ways."""
    if scaler.is_enabled():
        for found in scaler._per_optimizer_states[id(optimizer)]["found_inf_per_device"].values():
            dist.all_reduce(found, op=dist.ReduceOp.MAX)


def consolidated_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The full weights on rank 0's CPU (an empty dict on the others); collective. A tied weight is
    stored once, under the name safetensors' save_model keeps (the first in sorted order)."""
    full = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    return {name: full[name] for name in kept_names(model) if name in full}


def kept_names(model: torch.nn.Module) -> list[str]:
    aliases: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(name)
    kept = [sorted(names)[0] for names in aliases.values()]
    kept += [name for name, _ in model.named_buffers()]
    return kept
