"""Models derived from a checkpoint: rebuilt with their rewrites, and adapter checkpoints that hold
only what finetuning trained.

A finetuning run that trains part of a model (LoRA adapters, a new classification head) saves only
those tensors in its model.safetensors. Its spec record then names the checkpoint the rest comes
from, `"base": {"checkpoint": "/abs/step_dir", "sha256": "<hash of its model.safetensors>"}`; the
hash catches a base that was overwritten since. A checkpoint without "base" holds every weight.
"""
from __future__ import annotations

import hashlib
from dataclasses import dataclass
from pathlib import Path

import torch

from lmspec.compiler.vocab_padding import unpad_weights, unpadded_record

from lmspec.runtime.checkpoint.store import MODEL_FILE, Checkpoint, CheckpointError, load_checkpoint, read_tensors


def file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest.hexdigest()


def base_record(base: Checkpoint) -> dict:
    """The "base" entry of an adapter checkpoint's spec record that points at `base`."""
    path = base.path.resolve()
    return {"checkpoint": str(path), "sha256": file_sha256(path / MODEL_FILE)}


@dataclass
class Loaded:
    model: torch.nn.Module
    graph: object  # the ModelGraph, rewrites applied
    checkpoint: Checkpoint
    spec: dict  # the record of the model built: the checkpoint's, its vocabulary unpadded


def base_weights(checkpoint: Checkpoint, device="cpu") -> dict[str, torch.Tensor]:
    """The weights an adapter checkpoint's own file lacks, read from its base (checked by hash) onto
    `device`; an empty dict for a checkpoint that holds every weight."""
    base = checkpoint.spec.get("base")
    if not base:
        return {}
    path = Path(base["checkpoint"]) / MODEL_FILE
    if not path.is_file():
        raise CheckpointError(f"{checkpoint.path}: its base checkpoint {path} is missing")
    if file_sha256(path) != base["sha256"]:
        raise CheckpointError(f"{checkpoint.path}: its base checkpoint {path} has changed since the adapters "
                              f"were trained on it")
    base_checkpoint = load_checkpoint(base["checkpoint"])
    return with_tied_names(unpad_weights(read_tensors(path, device), base_checkpoint.spec), base_checkpoint)


def with_tied_names(weights: dict[str, torch.Tensor], checkpoint: Checkpoint) -> dict[str, torch.Tensor]:
    """`weights` with each tied weight under every name it has in the checkpoint's model: the file
    keeps one name of a tied pair (lm_head.weight, say), and a rewrite that removes that user (the
    classification head) leaves a model that asks for the other (wte.weight)."""
    from lmspec.compiler.rewrites import graph_from_record
    out = dict(weights)
    for name, param in graph_from_record(checkpoint.spec).params.items():
        if param.tied_to is not None:
            for have, want in ((name, param.tied_to), (param.tied_to, name)):
                if have in out and want not in out:
                    out[want] = out[have]
    return out


def load_weights(model: torch.nn.Module, checkpoint: Checkpoint) -> None:
    """Fill `model` from the checkpoint, and from its base for what the checkpoint lacks. Every
    weight must come from somewhere, with its shape; a tied weight may come under either name."""
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    own = unpad_weights(read_tensors(checkpoint.path / MODEL_FILE, device), checkpoint.spec)  # onto the model's device
    weights = base_weights(checkpoint, device) | own
    params = dict(model.named_parameters(remove_duplicate=False))
    aliases: dict[int, list[str]] = {}
    for name, p in params.items():
        aliases.setdefault(id(p), []).append(name)
    missing = []
    with torch.no_grad():
        for names in aliases.values():
            found = next((n for n in names if n in weights), None)
            if found is None:
                missing.append(names[0])
                continue
            target = params[names[0]]
            if tuple(weights[found].shape) != tuple(target.shape):
                raise CheckpointError(f"{checkpoint.path}: {found} has shape {tuple(weights[found].shape)}, "
                                      f"the model wants {tuple(target.shape)}")
            target.copy_(weights[found])
    if missing:
        raise CheckpointError(f"{checkpoint.path}: no weights for {', '.join(missing[:5])}"
                              + (f" and {len(missing) - 5} more" if len(missing) > 5 else ""))
    unknown = sorted(set(own) - set(params))
    if unknown:
        raise CheckpointError(f"{checkpoint.path / MODEL_FILE}: weights the model does not have: "
                              f"{', '.join(unknown[:5])}")


def load_model(path, device=None) -> Loaded:
    """Rebuild the model of any checkpoint (rewrites applied, adapters on their base), in eval mode,
    on `device` (default the CPU): built without weights, then filled from the files."""
    from lmspec.compiler.lower import lower
    from lmspec.compiler.rewrites import RewriteError

    from lmspec.compiler.rewrites import graph_from_record
    checkpoint = load_checkpoint(path)
    spec = unpadded_record(checkpoint.spec)  # a vocabulary padded for training is the tokenizer's again
    try:
        graph = graph_from_record(spec)
    except RewriteError as err:
        raise CheckpointError(f"{checkpoint.path}: {err}") from None
    model = lower(graph, seed=None, device=device)
    load_weights(model, checkpoint)
    model.eval()
    return Loaded(model, graph, checkpoint, spec)
