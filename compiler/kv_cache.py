"""The key/value cache that lowered attention layers read and write during generation.

Buffers are allocated lazily per layer on first use, because each attention op knows its own
kv-head count and head size; the cache only needs to know how long a sequence may grow. They grow
by doubling, so a model with a 128k context does not reserve 128k positions for a short prompt.

A layer with a sliding window sees only its last `window - 1` keys besides the new ones, so its
buffer is bounded: keys no query can see any more are dropped when the buffer fills, and it holds at
most about twice (window + new tokens) positions however long the generation runs.
"""
from __future__ import annotations

import torch

from .torch_modules import Attention


class KVCache:
    def __init__(self, max_len: int, kept: dict[int, int] | None = None):
        """`max_len`: the most positions a sequence may reach; `kept`: per layer with a sliding
        window, how many past keys its queries see (see past_keys_seen)."""
        self.max_len = max_len
        self.kept = kept or {}
        self.offset = 0  # tokens already stored; the next forward writes at this position
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}
        self._start: dict[int, int] = {}  # the position of a bounded layer's first buffered key

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v ([batch, kv_heads, new, head_dim]) at the current offset; return the keys/values
        of consecutive positions that end with the new ones: all of them, or for a bounded layer at
        least those its new queries can see."""
        new = k.shape[2]
        end = self.offset + new
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len {self.max_len}")
        start = self._start.get(layer, 0)
        held = self._keys[layer].shape[2] if layer in self._keys else 0
        if end - start > held:
            if layer in self.kept:  # drop what no query from here on sees: keys older than offset - kept
                live = max(start, self.offset - self.kept[layer])
                size = 2 * (self.kept[layer] + new)  # room to append as many again before the next drop
            else:
                live, size = start, min(self.max_len, max(end, 2 * held, 64))
            self._keys[layer] = _moved(self._keys.get(layer), k, size, live - start, self.offset - start)
            self._values[layer] = _moved(self._values.get(layer), v, size, live - start, self.offset - start)
            self._start[layer] = start = live
        self._keys[layer][:, :, self.offset - start:end - start] = k
        self._values[layer][:, :, self.offset - start:end - start] = v
        return self._keys[layer][:, :, :end - start], self._values[layer][:, :, :end - start]

    def advance(self, n: int) -> None:
        """Called by the generation loop once every layer has stored the n new tokens."""
        self.offset += n

    def reset(self) -> None:
        self.offset = 0
        self._keys.clear()
        self._values.clear()
        self._start.clear()


def _moved(old: torch.Tensor | None, like: torch.Tensor, size: int, first: int, stop: int) -> torch.Tensor:
    """A buffer of `size` positions that begins with old[:, :, first:stop]."""
    new = like.new_zeros((like.shape[0], like.shape[1], size, like.shape[3]))
    if old is not None:
        new[:, :, :stop - first] = old[:, :, first:stop]
    return new


def past_keys_seen(window: int | None, context: int | None) -> int | None:
    """How many past positions a query of a layer with this sliding window sees (window - 1), or None
    when that is the whole context anyway (the last position sees back to the first)."""
    if window is None or (context is not None and window >= context):
        return None
    return window - 1


def make_cache(model: torch.nn.Module, max_len: int | None = None) -> KVCache | None:
    """A cache for `model`, or None when its attention is written by hand and cannot use one."""
    if not getattr(model, "supports_kv_cache", False):
        return None
    context = getattr(model, "context", None)
    kept = {m.layer_index: past_keys_seen(m.cfg.window, context) for m in model.modules() if isinstance(m, Attention)}
    return KVCache(max_len or model.context, {layer: n for layer, n in kept.items() if n is not None})
