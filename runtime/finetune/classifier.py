"""A checkpoint finetuned into a classifier: the rewrite record that says so, its class names, and
the encoder its texts go through (the finetuning's tokenizer, max length and pad id)."""
from __future__ import annotations

from lmspec.runtime.data.text_encoder import TextEncoder
from lmspec.runtime.data.tokenizer import load_tokenizer
from lmspec.runtime.errors import CheckpointError, UsageError
from lmspec.runtime.finetune.instruct_data import pad_id_for

CLASSIFY = "classify"  # the rewrite kind (compiler/rewrites.py)


def classify_record(checkpoint) -> dict | None:
    """The classify rewrite a checkpoint's model was built with (its labels), or None."""
    return next((r for r in checkpoint.spec.get("rewrites", []) if r.get("kind") == CLASSIFY), None)


def classifier_inputs(loaded) -> tuple[list[str], TextEncoder]:
    """The class names of a loaded classifier checkpoint and the encoder its texts go through (the
    finetuning's tokenizer and max length); a CheckpointError for any other checkpoint."""
    record = classify_record(loaded.checkpoint)
    if record is None:
        raise CheckpointError(f"{loaded.checkpoint.path}: not a classifier (train one with "
                              f"`lmspec finetune classify`)")
    labels = record.get("labels") or [str(i) for i in range(record["classes"])]
    tokenizer = load_tokenizer(loaded.checkpoint.tokenizer)
    context = int(loaded.model.context)
    max_length = min(loaded.checkpoint.train_config.get("max_length") or context, context)
    return labels, TextEncoder(tokenizer, max_length, pad_id_for(tokenizer))


def trainable_names(graph, blocks: int | None) -> list[str] | None:
    """The parameters that train with --trainable-blocks `blocks`: those of the last `blocks` repeat
    iterations and every one after them (the final norm, the new head); None: all of them."""
    if blocks is None:
        return None
    order = {node: i for i, (node, _) in enumerate(graph.nodes())}
    in_block = [(i, data["block"]) for i, (_, data) in enumerate(graph.nodes()) if data["block"]]
    names = list(dict.fromkeys(block for _, block in in_block))
    if not 0 <= blocks <= len(names):
        raise UsageError(f"--trainable-blocks {blocks}: the model has {len(names)} blocks")
    chosen = set(names[len(names) - blocks:])
    after = in_block[-1][0] if in_block else -1
    return [name for name, p in graph.params.items()
            if graph.g.nodes[p.node]["block"] in chosen or order[p.node] > after]


def classifier_to_train(settings, labels: list[str], device=None):
    """(model, graph, base Loaded, spec record, adapters only?): `settings.checkpoint`'s model with the
    classification head (and LoRA adapters with `settings.lora`; `settings` as `finetune classify`'s options) on `device` (default the CPU), its base
    weights loaded, and only what should train taking gradients."""
    from lmspec.compiler.classify_head import HEAD_MODULE
    from lmspec.compiler.lower import lower
    from lmspec.compiler.rewrites import apply_rewrites
    from lmspec.runtime.checkpoint.models import base_record, load_model
    from lmspec.runtime.checkpoint.store import MODEL_FILE
    from lmspec.runtime.finetune.lora import lora_rewrite, mark_trainable

    base = load_model(settings.checkpoint, device)
    lora = lora_rewrite(settings)
    new = [{"kind": CLASSIFY, "classes": len(labels), "labels": labels}] + ([lora] if lora else [])
    graph = apply_rewrites(base.graph, new)
    spec = {k: v for k, v in base.spec.items() if k != "base"}  # base.spec: a padded vocabulary unpadded
    spec["rewrites"] = list(spec.get("rewrites", [])) + new
    if lora:
        if base.spec.get("base"):
            raise CheckpointError(f"{base.checkpoint.path}: holds adapters on another checkpoint; fold them in "
                                  f"first (lmspec lora merge) and finetune the merged checkpoint")
        spec["base"] = base_record(base.checkpoint)
    model = lower(graph, seed=settings.seed, device=device)
    # Every weight of the base keeps its name; what is new is the head (and adapters); what the base
    # has beyond the model is its vocabulary head, which the rewrite removed.
    missing, _ = model.load_state_dict(base.model.state_dict(), strict=False)
    fresh = {n for n in graph.params if n.startswith(HEAD_MODULE + ".") or n.endswith((".lora_a", ".lora_b"))}
    stray = sorted(set(missing) - fresh)
    if stray:
        raise CheckpointError(f"{base.checkpoint.path / MODEL_FILE}: has no weights for {', '.join(stray[:5])}")
    chosen = trainable_names(graph, settings.trainable_blocks)
    if lora:
        head = [n for n in graph.params if n.startswith(HEAD_MODULE + ".")]
        mark_trainable(model, graph, also=head + [n for n in chosen or [] if n not in head])
    else:
        wanted = set(graph.params if chosen is None else chosen)
        for name, p in model.named_parameters():
            p.requires_grad_(name in wanted)
    return model, graph, base, spec, bool(lora)
