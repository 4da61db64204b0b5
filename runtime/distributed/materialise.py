"""Weights for a model built on `meta` (compiler/lower.build), on its device, each process only its part.

A parallel run builds the whole model without storage, shards or cuts it (FSDP2, tensor parallel,
a pipeline stage), and only then gives each rank storage for what it keeps: no rank ever holds the
whole model in host memory. The values come from one of two sources:

- the seed's stream (compiler/lower.initial_weights): every rank walks it in the same order, one
  whole parameter at a time on the CPU, and keeps its share, so the same seed gives the same weights
  whatever the layout;
- a checkpoint's model.safetensors: each rank reads its own rows or columns of each tensor
  (safetensors slices), or, for a tensor-parallel layout that permutes fused rows, the tensor whole
  and then its share; either way one tensor at a time.

A tied weight is filled once, from its owner's value (a pipeline stage's copy of a weight tied
across stages takes the owner's value too).
"""
from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from torch import nn
from torch.distributed.tensor import DTensor, Replicate, Shard

from lmspec.compiler.graph import ModelGraph
from lmspec.compiler.lower import initial_fills, to_empty

from lmspec.runtime.distributed.canonical_state import _local_share, _split, plan_of
from lmspec.runtime.errors import CheckpointError


def is_on_meta(module: nn.Module) -> bool:
    """Whether the module was built without storage (some parameter is on `meta`)."""
    return any(_local(p).is_meta for p in module.parameters())


def _local(p: torch.Tensor) -> torch.Tensor:
    return p.to_local() if isinstance(p, DTensor) else p


def _unique_parameters(module: nn.Module) -> list[tuple[list[str], nn.Parameter]]:
    """Each parameter once, with every name it has in the module (tied weights have several)."""
    found: dict[int, tuple[list[str], nn.Parameter]] = {}
    for name, p in module.named_parameters(remove_duplicate=False):
        found.setdefault(id(p), ([], p))[0].append(name)
    return list(found.values())


def _owner(graph: ModelGraph, name: str) -> str:
    param = graph.params.get(name)
    return param.tied_to if param is not None and param.tied_to else name


def _drawn_in_place(p: torch.Tensor, split) -> bool:
    return (not isinstance(p, DTensor) and split is None and p.device.type == "cpu" and p.dtype == torch.float32
            and p.is_contiguous())


def _fill(p: torch.Tensor, local: torch.Tensor) -> None:
    target = _local(p)
    if tuple(local.shape) != tuple(target.shape):
        raise CheckpointError(f"a share of shape {tuple(local.shape)} does not fit {tuple(target.shape)}")
    target.copy_(local)


@torch.no_grad()
def materialise_initial(module: nn.Module, graph: ModelGraph, seed: int, device, plan=None,
                        buffer_device=None) -> None:
    """Storage on `device` for a module built on `meta` (the whole model, or a rank's shards or
    stage of it), filled with its share of the seed's initial weights. `plan`: the tensor-parallel
    plan the module was parallelized with (its fused rows are permuted)."""
    plan = plan_of(module, plan)
    to_empty(module, device, buffer_device)
    wanted: dict[str, list[tuple[str, nn.Parameter]]] = {}
    for names, p in _unique_parameters(module):
        wanted.setdefault(_owner(graph, names[0]), []).append((names[0], p))
    for name, shape, fill in initial_fills(graph, seed):
        targets = wanted.pop(name, ())
        if len(targets) == 1 and _drawn_in_place(targets[0][1], _split(plan, targets[0][0])):
            fill(targets[0][1])  # a whole fp32 parameter in host memory: no copy needed
            continue
        value = torch.empty(shape)
        fill(value)  # drawn whether this rank keeps any of it or not: the stream must advance alike
        for local_name, p in targets:
            _fill(p, _local_share(value, p, _split(plan, local_name), plan))
    if wanted:  # the graph and the module disagree: a bug, not a user's mistake
        raise ValueError(f"no initial value for {', '.join(sorted(wanted)[:5])}")


@torch.no_grad()
def materialise_from_file(module: nn.Module, graph: ModelGraph, path: str | Path, device, plan=None,
                          buffer_device=None) -> None:
    """Storage on `device` for a module built on `meta`, filled with its share of the weights in a
    checkpoint's model.safetensors (a tied weight may be stored under any of its names)."""
    plan = plan_of(module, plan)
    path = Path(path)
    to_empty(module, device, buffer_device)
    aliases: dict[str, list[str]] = {}
    for name in graph.params:
        aliases.setdefault(_owner(graph, name), []).append(name)
    try:
        with safe_open(str(path), "pt", device=str(torch.device(device))) as f:  # read straight onto the device
            stored = set(f.keys())
            for names, p in _unique_parameters(module):
                candidates = [*names, *aliases.get(_owner(graph, names[0]), [])]
                source = next((n for n in candidates if n in stored), None)
                if source is None:
                    raise CheckpointError(f"{path}: no weights for {names[0]}")
                _fill(p, _read_share(f, source, p, names[0], plan, path))
    except (SafetensorError, OSError) as err:
        raise CheckpointError(f"{path}: corrupt or unreadable ({err})") from None


def _read_share(f, name: str, p: torch.Tensor, local_name: str, plan, path: Path) -> torch.Tensor:
    """This rank's part of a stored tensor: only its slice read from disk when the layout is a plain
    split, else the whole tensor cut here (fused rows that tensor parallelism permutes)."""
    piece = f.get_slice(name)
    shape = tuple(piece.get_shape())
    if shape != tuple(p.shape):
        raise CheckpointError(f"{path}: {name} has shape {shape}, the model wants {tuple(p.shape)}")
    split = _split(plan, local_name)
    permuted = split is not None and len(split.sections) > 1
    if isinstance(p, DTensor) and not permuted and all(type(pl) in (Shard, Replicate) for pl in p.placements):
        from torch.distributed.tensor._utils import compute_local_shape_and_global_offset
        local_shape, offset = compute_local_shape_and_global_offset(p.shape, p.device_mesh, p.placements)
        rows = tuple(slice(o, o + n) for o, n in zip(offset, local_shape))
        return piece[rows].to(dtype=p.dtype) if rows else f.get_tensor(name).to(dtype=p.dtype)
    return _local_share(f.get_tensor(name), p, split, plan)
