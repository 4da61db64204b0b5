"""A checkpoint finetuned into a classifier: the rewrite record that says so, its class names, and
the encoder its texts go through (the finetuning's tokenizer, max length and pad id)."""
from __future__ import annotations

from lmspec.runtime.data.text_encoder import TextEncoder
from lmspec.runtime.data.tokenizer import load_tokenizer
from lmspec.runtime.errors import CheckpointError
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
