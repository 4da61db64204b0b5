"""The key/value cache that lowered attention layers read and write during generation.

Buffers are allocated lazily per layer on first use, because each attention op knows its own
kv-head count and head size; the cache only needs to know how long a sequence may grow. They grow
by doubling, so a model with a 128k context does not reserve 128k positions for a short prompt.
"""
from __future__ import annotations

import torch


class KVCache:
    def __init__(self, max_len: int):
        self.max_len = max_len
        self.offset = 0  # tokens already stored; the next forward writes at this position
        self._keys: dict[int, torch.Tensor] = {}
        self._values: dict[int, torch.Tensor] = {}

    def update(self, layer: int, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Store k, v ([batch, kv_heads, new, head_dim]) at the current offset; return all keys/values so far."""
        new = k.shape[2]
        end = self.offset + new
        if end > self.max_len:
            raise ValueError(f"KV cache overflow: {end} tokens > max_len {self.max_len}")
        held = self._keys[layer].shape[2] if layer in self._keys else 0
        if end > held:
            size = min(self.max_len, max(end, 2 * held, 64))
            self._keys[layer] = _grown(self._keys.get(layer), k, size, self.offset)
            self._values[layer] = _grown(self._values.get(layer), v, size, self.offset)
        self._keys[layer][:, :, self.offset:end] = k
        self._values[layer][:, :, self.offset:end] = v
        return self._keys[layer][:, :, :end], self._values[layer][:, :, :end]

    def advance(self, n: int) -> None:
        """Called by the generation loop once every layer has stored the n new tokens."""
        self.offset += n

    def reset(self) -> None:
        self.offset = 0
        self._keys.clear()
        self._values.clear()


def _grown(old: torch.Tensor | None, like: torch.Tensor, size: int, keep: int) -> torch.Tensor:
    new = like.new_zeros((like.shape[0], like.shape[1], size, like.shape[3]))
    if old is not None:
        new[:, :, :keep] = old[:, :, :keep]
    return new


def make_cache(model: torch.nn.Module, max_len: int | None = None) -> KVCache | None:
    """A cache for `model`, or None when its attention is written by hand and cannot use one."""
    if not getattr(model, "supports_kv_cache", False):
        return None
    return KVCache(max_len or model.context)
