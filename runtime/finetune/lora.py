"""LoRA for the finetune verbs: the rewrite record their --lora options ask for, and which
parameters train."""
from __future__ import annotations

from typing import Iterable

import torch

from lmspec.compiler.graph import ModelGraph
from lmspec.compiler.lora import lora_parameter_names, rewrites_without_lora, split_targets
from lmspec.runtime.errors import UsageError


DEFAULT_TARGETS = "attn.qkv,attn.proj,mlp.*"


def lora_rewrite(args) -> dict | None:
    """The LoRA rewrite record (compiler/rewrites.py) from --lora R, --lora-alpha A (default 2R) and
    --lora-targets, or None without --lora. Whether the targets match the model is checked when the
    record is applied (compiler.rewrites.apply_rewrites raises RewriteError)."""
    rank = getattr(args, "lora", None)
    if rank is None:
        given = [flag for flag, value in (("--lora-alpha", args.lora_alpha), ("--lora-targets", args.lora_targets))
                 if value is not None]
        if given:  # without --lora they would be ignored, and the whole model trained instead
            raise UsageError(f"{' and '.join(given)} shape LoRA adapters: add --lora R, their rank (such as 8)")
        return None
    if rank < 1:
        raise UsageError(f"--lora: the rank must be at least 1, got {rank}")
    alpha = args.lora_alpha if args.lora_alpha is not None else 2.0 * rank
    if not alpha > 0:
        raise UsageError(f"--lora-alpha must be positive, got {alpha}")
    targets = split_targets(DEFAULT_TARGETS if args.lora_targets is None else args.lora_targets)
    if not targets:
        raise UsageError("--lora-targets: give at least one module pattern, like attn.qkv,mlp.*")
    return {"kind": "lora", "rank": rank, "alpha": float(alpha), "targets": targets}


def mark_trainable(model: torch.nn.Module, graph: ModelGraph, also: Iterable[str] = ()) -> int:
    """Let only the LoRA adapters, and the parameters named in `also` (a new classification head),
    take gradients; freeze the rest. Returns how many numbers will train (each tensor counted once)."""
    wanted = set(lora_parameter_names(graph)) | set(also)
    params = dict(model.named_parameters(remove_duplicate=False))
    unknown = sorted(wanted - set(params))
    if unknown:
        raise ValueError(f"mark_trainable: the model has no parameters {', '.join(unknown)}")
    trainable = {id(params[name]) for name in wanted}
    count = 0
    for p in model.parameters():  # each tensor once, tied ones under any of their names
        p.requires_grad_(id(p) in trainable)
        count += p.numel() if id(p) in trainable else 0
    return count


def trainable_weights(model: torch.nn.Module) -> dict[str, torch.Tensor]:
    """The tensors that train, by name: what an adapter checkpoint saves (runtime/checkpoint/models.py)."""
    return {name: p.detach() for name, p in model.named_parameters() if p.requires_grad}


def merged_spec_record(spec: dict) -> dict:
    """A merged checkpoint's spec record: no LoRA rewrite (other rewrites kept), no base, since it
    holds every weight itself."""
    record = {k: v for k, v in spec.items() if k not in ("base", "rewrites")}
    rewrites = rewrites_without_lora(spec.get("rewrites", []))
    return record | ({"rewrites": rewrites} if rewrites else {})
