"""Where a finetuning run starts: a checkpoint's model, whole and training, or frozen under new LoRA
adapters that are saved alone beside a record of their base."""
from __future__ import annotations

import torch

from lmspec.runtime.checkpoint.models import base_record, load_model
from lmspec.runtime.checkpoint.store import MODEL_FILE, Checkpoint, CheckpointError


def model_to_finetune(args, seed: int, device=None) -> tuple[torch.nn.Module, object, Checkpoint, dict, bool]:
    """(model, graph, base checkpoint, spec record to save, adapters only?) for a finetune verb's run
    from args.checkpoint, on `device` (default the CPU): the whole model training, or with --lora
    (args as runtime/cli/lora_options.py's options) new adapters on the frozen base, saved alone with a
    "base" record pointing at it."""
    from lmspec.compiler.lora import ADAPTER_SUFFIXES
    from lmspec.compiler.lower import lower
    from lmspec.compiler.rewrites import graph_from_record
    from lmspec.runtime.finetune.lora import lora_rewrite, mark_trainable

    base = load_model(args.checkpoint, device)
    rewrite = lora_rewrite(args)
    if rewrite is None:  # every weight trains and is saved: the result stands alone
        spec = {k: v for k, v in base.spec.items() if k != "base"}
        for p in base.model.parameters():
            p.requires_grad_(True)
        return base.model, base.graph, base.checkpoint, spec, False
    if base.spec.get("base"):
        raise CheckpointError(f"{base.checkpoint.path}: holds adapters on another checkpoint; fold them in first "
                              f"(lmspec lora merge) and finetune the merged checkpoint")
    spec = base.spec | {"rewrites": list(base.spec.get("rewrites", [])) + [rewrite],
                                   "base": base_record(base.checkpoint)}
    graph = graph_from_record(spec)
    model = lower(graph, seed=seed, device=device)
    # The base's weights keep their names under LoRA; only the new adapters are missing.
    missing, unexpected = model.load_state_dict(base.model.state_dict(), strict=False)
    stray = [n for n in missing if not n.endswith(ADAPTER_SUFFIXES)] + list(unexpected)
    if stray:
        raise CheckpointError(f"{base.checkpoint.path / MODEL_FILE}: does not fit the LoRA model: {', '.join(stray[:5])}")
    mark_trainable(model, graph)
    return model, graph, base.checkpoint, spec, True
