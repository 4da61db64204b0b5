"""Tensor parallelism for lowered models, with PyTorch's DTensor API, following the graph's plan.

compiler/tensor_parallel.py decides, from the ModelGraph, how each parameter splits; this module
applies that plan to a lowered model in place with `parallelize_module` (ColwiseParallel,
RowwiseParallel) and Replicate DTensor parameters (replicated modules). Every parameter
becomes a DTensor on the 1-D "tp" mesh, so the optimizer, `clip_grad_norm_` and the state dicts see
one kind of tensor. DTensor inserts the collectives of the split layers (the all-reduce after a
row-parallel layer, the all-reduce of the input gradient before a column-parallel one); the one
written here (`sum_partial_gradients`, after the backward passes of a step) sums the gradient
of a replicated weight that each rank applied to its own part of the activations (q_norm/k_norm
below, and the sequence-parallel norms and position tables).

Per attention op: qkv column-parallel (ColwiseParallel: weight and bias Shard(0)), proj row-parallel
(RowwiseParallel: weight Shard(1), bias Replicate, output all-reduced), q_norm/k_norm
replicated, each rank normalising its own heads, with the weight's gradient summed over the ranks
after the backward pass (torch's SequenceParallel over the heads dim did that sum in torch 2.13 but
not in 2.11, which then trained with each rank's part of it). The module is told its local head
counts (`heads`, `kv_heads` attributes, which Attention.forward already reads), so it runs
unchanged on its heads. Per MLP: fc column-, proj row-parallel. Embedding: vocab-parallel (RowwiseParallel on nn.Embedding: rows Shard(0), masked
lookup, output all-reduced). Output head over the vocab: ColwiseParallel with its output gathered
(Replicate): the logits are whole on every rank, so the loss is the ordinary cross-entropy (simple;
loss_parallel would save the vocab all-gather). A tied head keeps one DTensor parameter with the
embedding (both are Shard(0) of [vocab, dim]). Everything else (norms, position tables, plain
linears, MoE) is replicated: Replicate DTensor parameters whose module runs on their local values
(swapped in for the call), so any op code works and every rank computes the same gradients.

Fused layouts. A fused tensor's rows are sections ([q heads | k heads | v heads] of qkv, [gate | up]
of a gated MLP's fc); a contiguous Shard(0) of the canonical layout would give rank 0 all of q and
part of k. Before distributing, the rows are permuted (compiler.tensor_parallel.fused_row_order) so
that rank r's contiguous chunk is [q_r | k_r | v_r] (or [gate_r | up_r]); then Shard(0) is exactly
Megatron's split, and the op module's own `split` / `chunk` of its local output is right. The
permutation is an implementation detail of the running model: runtime/distributed/canonical_state.py's
`full_state_dict` gathers and un-permutes, `load_full_state_dict` permutes and scatters, so
checkpoints (model.safetensors and the optimizer state by name, written through
torch.distributed.checkpoint) keep the single-process layout and names, and resume on any tp or none.

Data: every rank of a tp group must see the same batch (tp is not data parallelism); dropout masks
in replicated regions agree because every rank seeds alike (attention-probability dropout on a
rank's heads does not match one process's draw, only its distribution).
"""
from __future__ import annotations

import torch
import torch.fx as fx
from torch import nn
from torch.distributed.device_mesh import DeviceMesh, init_device_mesh
from torch.distributed.tensor import DTensor, Replicate, Shard, distribute_tensor
from torch.distributed.tensor.parallel import (
    ColwiseParallel,
    RowwiseParallel,
    parallelize_module,
)

from lmspec.compiler.tensor_parallel import ATTENTION, EMBEDDING, HEAD, MLP, TensorParallelPlan

from lmspec.runtime.distributed.canonical_state import fused_order

MESH_DIM = "tp"


def tensor_parallel_mesh(tp: int, device_type: str | None = None) -> DeviceMesh:
    """The 1-D mesh of `tp` ranks (the whole world: every rank is in the one tp group). The process
    group must exist already (distributed.join)."""
    device_type = device_type or ("cuda" if torch.cuda.is_available() else "cpu")
    return init_device_mesh(device_type, (tp,), mesh_dim_names=(MESH_DIM,))


def apply_tensor_parallel(model: fx.GraphModule, plan: TensorParallelPlan, mesh: DeviceMesh,
                          stage: bool = False) -> fx.GraphModule:
    """Parallelize a lowered model in place, as `plan` says; returns it. Call it on a model whose
    (canonical) weights are in place and identical on every rank (same seed, or a loaded checkpoint),
    before the optimizer is created. `stage`: the model is one pipeline stage, holding some of the
    plan's modules (a head whose tied embedding lives on another stage keeps its own copy, split
    as the embedding is)."""
    if mesh.size() != plan.tp:
        raise ValueError(f"the plan is for {plan.tp} ranks but the mesh has {mesh.size()}")
    missing = [m for m in plan.modules if not _has_module(model, m)]
    if missing and not stage:
        raise ValueError(f"the plan names modules the model lacks: {', '.join(missing[:3])}")
    present = {name for name, _ in model.named_parameters(remove_duplicate=False)}
    partial = []  # replicated weights each rank applies to its own part of the activations
    with torch.no_grad():  # fused tensors: each rank's contiguous chunk becomes [q_r|k_r|v_r] / [gate_r|up_r]
        for name, split in plan.params.items():
            if split.tied_to is None and len(split.sections) > 1 and name in present:
                p = model.get_parameter(name)
                p.copy_(p[fused_order(split, plan.tp, p.device)])
    sp = plan.sequence_parallel
    # under sequence parallelism the row-parallel outputs are reduce-scattered along the sequence
    # instead of all-reduced, and attention and the MLP gather the sequence on the way in
    out = Shard(1) if sp else Replicate()
    for path, rule in plan.modules.items():
        if path in missing:
            continue
        module = model.get_submodule(path)
        if sp and rule.kind in (ATTENTION, MLP):
            module.register_forward_pre_hook(_gather_sequence(mesh))
        if rule.kind == ATTENTION:
            parallelize_module(module, mesh, {"qkv": ColwiseParallel(), "proj": RowwiseParallel(output_layouts=out)})
            for norm in ("q_norm", "k_norm"):  # [batch, seq, heads, head_dim]: each rank its heads
                if hasattr(module, norm):
                    _replicate(getattr(module, norm), mesh)
                    partial.extend(getattr(module, norm).parameters())
            module.heads, module.kv_heads = rule.heads, rule.kv_heads
        elif rule.kind == MLP:
            parallelize_module(module, mesh, {"fc": ColwiseParallel(), "proj": RowwiseParallel(output_layouts=out)})
        elif rule.kind == EMBEDDING:
            parallelize_module(module, mesh, RowwiseParallel(input_layouts=Replicate(), output_layouts=out))
        elif rule.kind == HEAD:
            parallelize_module(module, mesh, ColwiseParallel(input_layouts=out, output_layouts=Replicate()))
        else:
            _replicate(module, mesh)
            if sp:  # fed a slice of the sequence, it computes its slice's part of its weights' gradient
                partial.extend(module.parameters())
            if sp and rule.op == "position":  # the table's rows for this rank's slice of the sequence
                module.register_forward_hook(_slice_sequence(mesh))
    # parallelize_module gives each module a new Parameter: tie the aliases to their owner again
    for name, split in plan.params.items():
        if split.tied_to is not None and split.tied_to in present and name in present:
            *parents, leaf = name.split(".")
            setattr(model.get_submodule(".".join(parents)), leaf, model.get_parameter(split.tied_to))
    model.tensor_parallel = plan
    model.partial_gradient_params = partial
    return model


def _gather_sequence(mesh: DeviceMesh):
    """A pre-hook: the module's first input, split along the sequence (dim 1), made whole on every
    rank (all-gather; its gradient is reduce-scattered back)."""
    def hook(module, args):
        x, *rest = args
        whole = DTensor.from_local(x, mesh, [Shard(1)], run_check=False).redistribute(mesh, [Replicate()])
        return (whole.to_local(), *rest)
    return hook


def _slice_sequence(mesh: DeviceMesh):
    """A forward hook: this rank's rows (positions) of a [..., seq, dim] output."""
    def hook(module, args, output):
        n, r = mesh.size(), mesh.get_local_rank()
        if output.size(-2) % n:
            raise ValueError(f"sequence parallelism: a sequence of {output.size(-2)} does not split over {n} ranks")
        size = output.size(-2) // n
        return output.narrow(-2, r * size, size)
    return hook


@torch.no_grad()
def sum_partial_gradients(model: nn.Module) -> None:
    """Sum over the tp group the gradients of replicated weights that each rank applied to its own
    part of the activations (q_norm/k_norm over a rank's heads; under sequence parallelism the
    norms and position tables over a rank's slice of the sequence): each rank holds its part. Call
    after the backward passes of a step, before clipping: one bucketed all-reduce a step, however
    many micro-batches."""
    params = getattr(model, "partial_gradient_params", ())
    if not params:
        return
    from lmspec.runtime.distributed.collectives import all_reduce_in_buckets
    all_reduce_in_buckets([p.grad.to_local() for p in params if p.grad is not None], params[0].device_mesh.get_group())


def _has_module(model: nn.Module, path: str) -> bool:
    try:
        model.get_submodule(path)
        return True
    except AttributeError:
        return False


def _replicate(module: nn.Module, mesh: DeviceMesh) -> None:
    """Replicate a module's parameters as DTensors, while its forward runs on plain tensors: just
    before it, each parameter is swapped for its local value (`to_local()`, differentiable: the
    gradient comes back to the DTensor as Replicate), and put back after. Any op code runs unchanged
    (MoE routing, hand-written blocks), where DTensor sharding rules might be missing. Correct
    because a replicated module sees the same inputs and output gradients on every rank; a module
    that sees each rank's part of them (q_norm over a rank's heads) has its weights' gradient summed
    over the ranks by `sum_partial_gradients`."""
    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None and not isinstance(p, DTensor):
                sub.register_parameter(name, nn.Parameter(distribute_tensor(p.data, mesh, [Replicate()]),
                                                          requires_grad=p.requires_grad))
    module.register_forward_pre_hook(_to_local_parameters)
    module.register_forward_hook(_restore_parameters, always_call=True)


def _to_local_parameters(module, args):
    stash = []
    for sub in module.modules():
        for name, p in sub._parameters.items():
            if isinstance(p, DTensor):
                stash.append((sub, name, p))
                sub._parameters[name] = p.to_local()
    module._tp_stash = stash


def _restore_parameters(module, args, output):
    for sub, name, p in getattr(module, "_tp_stash", ()):
        sub._parameters[name] = p
    module._tp_stash = []
    return output


# ------------------------------------------------------------------------------ checkpoints
