"""A model-parallel model's state as one process would hold it: the canonical layout.

Tensor parallelism permutes fused rows (compiler/tensor_parallel.py's fused_row_order) and shards
every parameter as a DTensor; FSDP shards without permuting; a pipeline stage holds plain tensors.
Checkpoints, parity tests and resumption all speak the single-process layout instead: whole tensors,
un-permuted, under the single-process names. This module converts both ways, for weights,
gradients and optimizer state, whatever the parallelism (plain tensors pass through unchanged).
"""
from __future__ import annotations

import torch
import torch.distributed as dist
from torch import nn
from torch.distributed.tensor import DTensor, Replicate

from lmspec.compiler.tensor_parallel import TensorParallelPlan, fused_row_order, inverse_order

from lmspec.runtime.errors import CheckpointError


def fused_order(split, tp: int, device) -> torch.Tensor:
    """The row order that gives each of `tp` ranks a contiguous shard of its own sections."""
    return torch.tensor(fused_row_order(split.shape[split.dim], split.sections, tp), device=device)


def _inverse(split, tp: int, device) -> torch.Tensor:
    return torch.tensor(inverse_order(fused_row_order(split.shape[split.dim], split.sections, tp)), device=device)


def plan_of(model: nn.Module, plan: TensorParallelPlan | None) -> TensorParallelPlan | None:
    """The plan a model was parallelized with; None for DTensors of FSDP alone (nothing permuted)."""
    return plan if plan is not None else getattr(model, "tensor_parallel", None)


def _split(plan: TensorParallelPlan | None, name: str):
    return plan.params.get(name) if plan is not None else None


def _canonical(value: torch.Tensor, split, plan: TensorParallelPlan) -> torch.Tensor:
    """A parameter-shaped tensor (a weight, a gradient, an optimizer moment) of the running model as
    one process would hold it: gathered (collective) and un-permuted, on the CPU."""
    if isinstance(value, DTensor):  # only a parallelized model's tensors are permuted
        value = value.full_tensor()
        if split is not None and len(split.sections) > 1:
            value = value[_inverse(split, plan.tp, value.device)]
    return value.detach().cpu()


def full_state_dict(model: nn.Module, plan: TensorParallelPlan | None = None) -> dict[str, torch.Tensor]:
    """The single-process state_dict of a tensor-parallel model: the same names (tied ones under each
    name, as nn.Module.state_dict gives them), whole and in the canonical layout, on the CPU of every
    rank. Collective: every rank calls it."""
    plan = plan_of(model, plan)
    seen: dict[int, torch.Tensor] = {}
    out = {}
    for name, value in model.state_dict(keep_vars=True).items():
        if id(value) not in seen:
            seen[id(value)] = _canonical(value, _split(plan, name), plan).clone()
        out[name] = seen[id(value)]
    return out


def full_gradients(model: nn.Module, plan: TensorParallelPlan | None = None) -> dict[str, torch.Tensor]:
    """Each parameter's gradient, whole and canonical, by name (tied ones once). Collective."""
    plan = plan_of(model, plan)
    return {name: _canonical(p.grad, _split(plan, name), plan)
            for name, p in model.named_parameters() if p.grad is not None}


def _local_share(full: torch.Tensor, current: torch.Tensor, split, plan: TensorParallelPlan) -> torch.Tensor:
    """This rank's part of a canonical whole tensor, laid out as `current` (a DTensor or not)."""
    full = full.to(device=current.device, dtype=current.dtype)
    if split is not None and len(split.sections) > 1:
        full = full[fused_order(split, plan.tp, full.device)]
    if isinstance(current, DTensor):  # every rank holds `full`: cut locally, no communication
        # (Replicate -> Shard is a local slice, and it knows FSDP x TP's _StridedShard)
        replicated = DTensor.from_local(full, current.device_mesh, [Replicate()] * current.device_mesh.ndim,
                                        run_check=False)
        return replicated.redistribute(current.device_mesh, current.placements).to_local()
    return full


def load_full_state_dict(model: nn.Module, plan: TensorParallelPlan | None, state: dict[str, torch.Tensor]) -> None:
    """Copy canonical whole weights (a single-process state_dict or model.safetensors, where a tied
    weight may appear under one of its names only) into a tensor-parallel model. Every rank passes
    the same `state`; no communication."""
    plan = plan_of(model, plan)
    aliases: dict[int, list[str]] = {}
    tensors: dict[int, torch.Tensor] = {}
    for name, value in model.state_dict(keep_vars=True).items():
        aliases.setdefault(id(value), []).append(name)
        tensors[id(value)] = value
    unexpected = set(state) - {n for names in aliases.values() for n in names}
    if unexpected:
        raise CheckpointError(f"weights for names the model lacks: {', '.join(sorted(unexpected)[:5])}")
    with torch.no_grad():
        for key, names in aliases.items():
            given = next((n for n in names if n in state), None)
            if given is None:
                raise CheckpointError(f"no weights for {names[0]}")
            current = tensors[key]
            if tuple(state[given].shape) != tuple(current.shape):
                raise CheckpointError(f"{given}: shape {tuple(state[given].shape)} does not fit {tuple(current.shape)}")
            local = _local_share(state[given], current, _split(plan, given), plan)
            (current.to_local() if isinstance(current, DTensor) else current).copy_(local)


# ------------------------------------------------------------------------------ optimizer state

def canonical_optimizer_state(name: str, values: dict, plan: TensorParallelPlan | None) -> dict:
    """One parameter's optimizer state (moments, step) whole and in the single-process layout, on
    the CPU; collective when the moments are DTensors."""
    return {k: _canonical(v, _split(plan, name), plan) if isinstance(v, torch.Tensor) and v.dim() else
            (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in values.items()}


def full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer,
                              plan: TensorParallelPlan | None = None) -> dict:
    """The optimizer state keyed by parameter name with whole, canonical tensors, in the form
    checkpoint.read_optimizer_by_name returns ({"state": {name: {...}}, "param_groups": [...]}).
    Collective."""
    return {"state": owned_optimizer_state(model, optimizer, plan=plan_of(model, plan)),
            "param_groups": param_groups_by_name(model, optimizer)}


def load_full_optimizer_state_dict(model: nn.Module, optimizer: torch.optim.Optimizer,
                                   plan: TensorParallelPlan | None, by_name: dict) -> None:
    """Restore optimizer state saved by name in the canonical layout (by any run: one process, DDP,
    tensor parallel of any size) into this tensor-parallel run's optimizer. No communication."""
    plan = plan_of(model, plan)
    current = param_names_by_group(optimizer, model)
    if [list(g["params"]) for g in by_name["param_groups"]] != current:
        raise CheckpointError("the saved optimizer's parameter groups do not match the model's parameters")
    index = {n: i for i, n in enumerate(n for names in current for n in names)}
    params = dict(model.named_parameters())
    state = {}
    for name, values in by_name["state"].items():
        p = params[name]
        state[index[name]] = {k: _local_share(v, p, _split(plan, name), plan).to(v.dtype) if
                              isinstance(v, torch.Tensor) and tuple(v.shape) == tuple(p.shape) and v.dim()
                              else v for k, v in values.items()}
        for k, v in state[index[name]].items():  # moments as DTensors laid out like their parameter
            if isinstance(p, DTensor) and isinstance(v, torch.Tensor) and not isinstance(v, DTensor) and v.dim():
                state[index[name]][k] = DTensor.from_local(v, p.device_mesh, p.placements, run_check=False,
                                                           shape=p.shape, stride=p.stride())  # uneven shards
    groups = [g | {"params": [index[n] for n in g["params"]]} for g in by_name["param_groups"]]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError, RuntimeError) as err:
        raise CheckpointError(f"the optimizer state does not fit this run: {err}") from None


def param_names_by_group(optimizer: torch.optim.Optimizer, model: torch.nn.Module) -> list[list[str]]:
    """The names of each optimizer group's parameters, in order; a CheckpointError for a parameter the
    model does not hold."""
    names = {id(p): n for n, p in model.named_parameters()}
    groups = []
    for group in optimizer.param_groups:
        try:
            groups.append([names[id(p)] for p in group["params"]])
        except KeyError:
            raise CheckpointError("the optimizer holds a parameter that is not part of the model") from None
    return groups


def owned_optimizer_state(module: torch.nn.Module, optimizer: torch.optim.Optimizer, *, plan=None,
                          skip=frozenset(), peers: int = 1, index: int = 0) -> dict[str, dict]:
    """This rank's share of the optimizer state by name: parameter i of the module (those in `skip`,
    a tied copy, left out) when i % peers == index. Every peer calls it (the gathers are collective)."""
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
