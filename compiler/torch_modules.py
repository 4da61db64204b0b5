"""The torch modules that ops with more than one weight lower to.

Parameter names inside each module are the ones the op registry declares in `params`,
so a graph's parameter names and the lowered module's state_dict keys are the same.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

_ACT = {
    "gelu": lambda x: F.gelu(x),
    "gelu_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "silu": F.silu,
    "relu": F.relu,
}


def causal_mask(scores: torch.Tensor) -> torch.Tensor:
    t, s = scores.shape[-2], scores.shape[-1]
    keep = torch.ones(t, s, dtype=torch.bool, device=scores.device).tril(diagonal=s - t)
    return scores.masked_fill(~keep, float("-inf"))


class Position(nn.Module):
    def __init__(self, context: int, dim: int):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(context, dim))

    def forward(self, seq: int, cache=None) -> torch.Tensor:
        # A cache that carries explicit positions ([batch, seq]: left-padded batches, ONNX export)
        # gives each row its own; otherwise positions continue from the cache's offset.
        position_ids = getattr(cache, "position_ids", None)
        if position_ids is not None:
            return F.embedding(position_ids, self.weight)
        start = cache.offset if cache is not None else 0
        return self.weight[start:start + seq]


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, bias: bool):
        super().__init__()
        self.fc = nn.Linear(dim, hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.act = act

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(_ACT[self.act](self.fc(x)))


class Attention(nn.Module):
    def __init__(self, dim: int, heads: int, kv_heads: int, causal: bool, bias: bool, dropout: float,
                 layer_index: int):
        super().__init__()
        self.heads, self.kv_heads, self.head_dim = heads, kv_heads, dim // heads
        self.causal, self.dropout, self.layer_index = causal, dropout, layer_index
        self.qkv = nn.Linear(dim, (heads + 2 * kv_heads) * self.head_dim, bias=bias)
        self.proj = nn.Linear(dim, dim, bias=bias)

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        b, t, d = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split([self.heads * hd, self.kv_heads * hd, self.kv_heads * hd], dim=-1)
        q = q.view(b, t, self.heads, hd).transpose(1, 2)
        k = k.view(b, t, self.kv_heads, hd).transpose(1, 2)
        v = v.view(b, t, self.kv_heads, hd).transpose(1, 2)
        mask, is_causal = None, self.causal
        if getattr(cache, "attention_mask", None) is not None:
            # A cache with a padding mask builds the whole [batch, 1, t, s] mask itself.
            k, v = cache.update(self.layer_index, k, v)
            mask, is_causal = cache.mask(t, k.shape[2], self.causal), False
        elif cache is not None:
            offset = cache.offset
            k, v = cache.update(self.layer_index, k, v)
            if self.causal and offset > 0:
                is_causal = False
                if t > 1:  # new queries see the whole past plus the causal part of the new block
                    mask = torch.ones(t, k.shape[2], dtype=torch.bool, device=x.device).tril(diagonal=offset)
        y = F.scaled_dot_product_attention(
            q, k, v, attn_mask=mask, is_causal=is_causal,
            dropout_p=self.dropout if self.training else 0.0,
            enable_gqa=self.kv_heads != self.heads,
        )
        return self.proj(y.transpose(1, 2).reshape(b, t, d))
