"""A vocabulary padded to a multiple that suits the GPU's matrix units (`lmspec train --pad-vocab 64`),
and undoing it for everything but training.

Padding GPT-2's 50,257 tokens to 50,304 makes the embedding and the head multiples of 64, which
tensor cores tile without a ragged edge. The extra rows are never a target, so training pushes their
logits down and they are never sampled. A padded run's spec record keeps its real vocabulary under
"vocab_padding"; training and resuming build the padded model, while every other reader (sample,
eval, export, finetuning) builds the model the tokenizer describes and takes the first rows or
columns of the padded weights (nanoGPT's trick, made invisible outside the training loop).
"""
from __future__ import annotations

from .rewrites import VOCAB_PADDING as RECORD_KEY


def padded(vocab: int, multiple: int) -> int:
    """`vocab` rounded up to a multiple of `multiple`."""
    return -(-vocab // multiple) * multiple


def padding_of(record: dict) -> dict | None:
    """{"vocab": the real size, "multiple": N} for a padded run's spec record, else None."""
    return record.get(RECORD_KEY) or None


def unpadded_record(record: dict) -> dict:
    """The spec record of the model the tokenizer describes: the padded record with its real vocab."""
    padding = padding_of(record)
    if padding is None:
        return record
    out = {k: v for k, v in record.items() if k != RECORD_KEY}
    return out | {"overrides": {**record["overrides"], "vocab": padding["vocab"]}}


def unpadded_shapes(record: dict) -> dict[str, tuple[tuple, tuple]]:
    """{parameter: (padded shape, real shape)} for the parameters padding changes (none unpadded)."""
    if padding_of(record) is None:
        return {}
    from .rewrites import graph_from_record
    big, small = graph_from_record(record).params, graph_from_record(unpadded_record(record)).params
    return {name: (tuple(big[name].shape), tuple(p.shape)) for name, p in small.items()
            if name in big and tuple(big[name].shape) != tuple(p.shape)}


def unpad(tensor, shape: tuple):
    """The leading rows / columns of a padded tensor that the real model's `shape` holds."""
    return tensor[tuple(slice(0, n) for n in shape)]


def unpad_weights(weights: dict, record: dict) -> dict:
    """A padded run's weights (by name, tied ones under any of their names) cut to the real model."""
    shapes = unpadded_shapes(record)
    if not shapes:
        return weights
    from .rewrites import graph_from_record
    params = graph_from_record(record).params
    out = {}
    for name, tensor in weights.items():
        owner = params[name].tied_to if name in params and params[name].tied_to else name
        changed = shapes.get(name) or shapes.get(owner)
        out[name] = unpad(tensor, changed[1]) if changed and tuple(tensor.shape) == changed[0] else tensor
    return out
