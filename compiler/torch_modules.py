"""The torch modules that ops with more than one weight lower to.

Parameter names inside each module are the ones the op registry declares in `params`,
so a graph's parameter names and the lowered module's state_dict keys are the same.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

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
    return scores.masked_fill(~visible_keys(t, s, True, None, scores.device), float("-inf"))


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


class OffsetRMSNorm(nn.Module):
    """RMSNorm that scales by offset + weight (Gemma's 1 + w), in float32 like its reference."""

    def __init__(self, dim: int, eps: float, offset: float):
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim))
        self.eps, self.offset = eps, offset

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        return (y * (self.offset + self.weight.float())).to(x.dtype)


class MLP(nn.Module):
    def __init__(self, dim: int, hidden: int, act: str, bias: bool, gated: bool = False):
        super().__init__()
        self.fc = nn.Linear(dim, 2 * hidden if gated else hidden, bias=bias)
        self.proj = nn.Linear(hidden, dim, bias=bias)
        self.act, self.gated = act, gated

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = self.fc(x)
        return self.proj(_glu(self.act, h) if self.gated else _ACT[self.act](h))


def _glu(act: str, h: torch.Tensor) -> torch.Tensor:
    """act(gate) * up, with h holding gate then up along its last dim."""
    gate, up = h.chunk(2, dim=-1)
    return _ACT[act](gate) * up


def softcap(x: torch.Tensor, cap: float) -> torch.Tensor:
    return torch.tanh(x / cap) * cap


def rope_frequencies(rotary_dim: int, theta: float, scaling: str | None = None, factor: float = 1.0,
                     low: float = 1.0, high: float = 4.0, original_context: int | None = None) -> torch.Tensor:
    """Inverse frequencies of rotary embeddings, [rotary_dim / 2], computed as Hugging Face does
    (so imported checkpoints match to the last bit); "linear" divides them by `factor`, "llama3"
    rescales the low frequencies smoothly (Llama 3.1's long-context scaling)."""
    # on the CPU even while a model is built on `meta`: a small table its buffer keeps (compiler/lower.py)
    inv = 1.0 / (theta ** (torch.arange(0, rotary_dim, 2, dtype=torch.int64, device="cpu").float() / rotary_dim))
    if scaling == "linear":
        return inv / factor
    if scaling == "llama3":
        low_wavelen, high_wavelen = original_context / low, original_context / high
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > low_wavelen, inv / factor, inv)
        smooth = (original_context / wavelen - low) / (high - low)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < high_wavelen) & ~(wavelen > low_wavelen)
        return torch.where(medium, smoothed, scaled)
    return inv


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    a, b = x.chunk(2, dim=-1)
    return torch.cat((-b, a), dim=-1)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the first cos.shape[-1] features of x ([batch, heads, t, head_dim]); the rest pass."""
    rot = cos.shape[-1]
    if rot == x.shape[-1]:
        return x * cos + _rotate_half(x) * sin
    x_rot, x_pass = x[..., :rot], x[..., rot:]
    return torch.cat((x_rot * cos + _rotate_half(x_rot) * sin, x_pass), dim=-1)


def positions_of(cache, t: int, device) -> torch.Tensor:
    """Positions of the new tokens, [batch or 1, t]: a cache's explicit ones (left-padded batches,
    ONNX export), else counting on from the cache's offset."""
    position_ids = getattr(cache, "position_ids", None)
    if position_ids is not None:
        return position_ids
    start = cache.offset if cache is not None else 0
    return torch.arange(start, start + t, device=device)[None]


@dataclass(frozen=True)
class AttentionConfig:
    dim: int
    heads: int
    kv_heads: int
    head_dim: int
    causal: bool = True
    bias: bool = True
    out_bias: bool = True
    dropout: float = 0.0
    rope: bool = False
    rope_theta: float = 10000.0
    rotary_dim: int | None = None
    rope_scaling: str | None = None
    rope_factor: float = 1.0
    rope_low: float = 1.0
    rope_high: float = 4.0
    rope_original: int | None = None
    qk_norm: bool = False
    qk_norm_eps: float = 1e-6
    qk_norm_offset: float = 0.0
    qk_norm_scope: str = "head"  # or "projection": the whole q and k, before they split into heads
    window: int | None = None
    softcap: float | None = None
    scale: float | None = None


class Attention(nn.Module):
    def __init__(self, cfg: AttentionConfig, layer_index: int):
        super().__init__()
        self.cfg, self.layer_index = cfg, layer_index
        self.heads, self.kv_heads, self.head_dim = cfg.heads, cfg.kv_heads, cfg.head_dim
        hd = cfg.head_dim
        self.qkv = nn.Linear(cfg.dim, (cfg.heads + 2 * cfg.kv_heads) * hd, bias=cfg.bias)
        self.proj = nn.Linear(cfg.heads * hd, cfg.dim, bias=cfg.out_bias)
        if cfg.qk_norm:
            whole = cfg.qk_norm_scope == "projection"
            q_dim, k_dim = (cfg.heads * hd, cfg.kv_heads * hd) if whole else (hd, hd)
            if cfg.qk_norm_offset:
                self.q_norm = OffsetRMSNorm(q_dim, cfg.qk_norm_eps, cfg.qk_norm_offset)
                self.k_norm = OffsetRMSNorm(k_dim, cfg.qk_norm_eps, cfg.qk_norm_offset)
            else:
                self.q_norm = nn.RMSNorm(q_dim, eps=cfg.qk_norm_eps)
                self.k_norm = nn.RMSNorm(k_dim, eps=cfg.qk_norm_eps)
        if cfg.rope:
            inv = rope_frequencies(cfg.rotary_dim or hd, cfg.rope_theta, cfg.rope_scaling, cfg.rope_factor,
                                   cfg.rope_low, cfg.rope_high, cfg.rope_original)
            self.register_buffer("inv_freq", inv, persistent=False)
        # The fused kernel cannot soft-cap scores; a window needs an explicit mask.
        self.plain = cfg.softcap is not None

    def forward(self, x: torch.Tensor, cache=None) -> torch.Tensor:
        cfg = self.cfg
        b, t, _ = x.shape
        hd = self.head_dim
        q, k, v = self.qkv(x).split([self.heads * hd, self.kv_heads * hd, self.kv_heads * hd], dim=-1)
        whole = cfg.qk_norm_scope == "projection"
        if cfg.qk_norm and whole:
            q, k = self.q_norm(q), self.k_norm(k)
        q = q.view(b, t, self.heads, hd)
        k = k.view(b, t, self.kv_heads, hd)
        if cfg.qk_norm and not whole:
            q, k = self.q_norm(q), self.k_norm(k)
        q, k = q.transpose(1, 2), k.transpose(1, 2)
        v = v.view(b, t, self.kv_heads, hd).transpose(1, 2)
        if cfg.rope:
            freqs = positions_of(cache, t, x.device)[..., None].float() * self.inv_freq.float()
            angles = torch.cat((freqs, freqs), dim=-1)[:, None]  # [batch or 1, 1, t, rotary_dim]
            cos, sin = angles.cos().to(q.dtype), angles.sin().to(q.dtype)
            q, k = apply_rope(q, cos, sin), apply_rope(k, cos, sin)
        if hasattr(cache, "attend"):  # an export that runs attention as one fused onnxruntime kernel
            return self.proj(cache.attend(self, q, k, v))
        mask, is_causal = None, cfg.causal
        if getattr(cache, "attention_mask", None) is not None:
            # A cache with a padding mask builds the whole [batch, 1, t, s] mask itself.
            k, v = cache.update(self.layer_index, k, v)
            mask, is_causal = cache.mask(t, k.shape[2], cfg.causal, cfg.window), False
        else:
            offset = 0
            if cache is not None:
                offset = cache.offset
                k, v = cache.update(self.layer_index, k, v)
            if cfg.window is not None or (cfg.causal and offset > 0 and t > 1):
                mask, is_causal = visible_keys(t, k.shape[2], cfg.causal, cfg.window, x.device), False
            elif offset > 0:  # one new query sees the whole past
                is_causal = False
        dropout = cfg.dropout if self.training else 0.0
        if self.plain:
            y = plain_attention(q, k, v, mask, is_causal, cfg.scale, cfg.softcap, dropout)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=is_causal, dropout_p=dropout,
                                               scale=cfg.scale, enable_gqa=self.kv_heads != self.heads)
        return self.proj(y.transpose(1, 2).reshape(b, t, self.heads * hd))


def visible_keys(t: int, s: int, causal: bool, window: int | None, device) -> torch.Tensor:
    """[t, s] bool: which of s keys each of the last t queries sees (causal, within the window)."""
    query = torch.arange(s - t, s, device=device)[:, None]
    key = torch.arange(s, device=device)[None]
    keep = key <= query if causal else torch.ones(t, s, dtype=torch.bool, device=device)
    if window is not None:
        keep = keep & (query - key < window)
    return keep


def plain_attention(q, k, v, mask, is_causal, scale, cap, dropout):
    if k.shape[1] != q.shape[1]:
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        v = v.repeat_interleave(q.shape[1] // v.shape[1], dim=1)
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    scores = torch.matmul(q * scale, k.transpose(-2, -1))
    if cap is not None:
        scores = softcap(scores, cap)
    if is_causal:
        mask = visible_keys(q.shape[2], k.shape[2], True, None, q.device)
    if mask is not None:
        scores = scores.masked_fill(~mask, torch.finfo(scores.dtype).min)
    weights = torch.softmax(scores.float(), dim=-1).to(q.dtype)
    if dropout:
        weights = F.dropout(weights, dropout)
    return torch.matmul(weights, v)


class MoE(nn.Module):
    def __init__(self, dim: int, experts: int, top_k: int, hidden: int, act: str, norm_topk: bool):
        super().__init__()
        self.router = nn.Linear(dim, experts, bias=False)
        self.fc_weight = nn.Parameter(torch.empty(experts, 2 * hidden, dim))
        self.proj_weight = nn.Parameter(torch.empty(experts, dim, hidden))
        self.experts, self.top_k, self.act, self.norm_topk = experts, top_k, act, norm_topk

    def expert(self, e: int, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_glu(self.act, F.linear(x, self.fc_weight[e])), self.proj_weight[e])

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        shape = x.shape
        x = x.reshape(-1, shape[-1])
        probs = torch.softmax(self.router(x).float(), dim=-1)
        weights, chosen = torch.topk(probs, self.top_k, dim=-1)
        if self.norm_topk:
            weights = weights / weights.sum(dim=-1, keepdim=True)
        weights = weights.to(x.dtype)
        out = torch.zeros_like(x)
        if torch.compiler.is_compiling():
            # Traced (torch.compile, ONNX export): every expert on every token, weighted by the
            # router (zero for experts not chosen): the same sums, with no data-dependent shapes.
            dense = torch.zeros(x.shape[0], self.experts, dtype=x.dtype, device=x.device)
            dense = dense.scatter(1, chosen, weights)
            for e in range(self.experts):
                out = out + dense[:, e:e + 1] * self.expert(e, x)
        else:
            for e in range(self.experts):
                token, slot = torch.where(chosen == e)
                if token.numel():
                    out.index_add_(0, token, self.expert(e, x[token]) * weights[token, slot, None])
        return out.reshape(shape)


class LoRALinear(nn.Module):
    """A linear layer with a low-rank update beside it: x W^T + b + scale * (x A^T) B^T.

    It keeps the wrapped layer's `weight` and `bias` (the same Parameters, so tied and base weights
    keep their names) and adds `lora_a` [rank, in] and `lora_b` [out, rank]."""

    def __init__(self, linear: nn.Linear, rank: int, scale: float):
        super().__init__()
        self.weight, self.bias = linear.weight, linear.bias
        out_features, in_features = linear.weight.shape
        self.lora_a = nn.Parameter(torch.empty(rank, in_features))
        self.lora_b = nn.Parameter(torch.empty(out_features, rank))
        self.scale = scale

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(x, self.weight, self.bias) + self.scale * F.linear(F.linear(x, self.lora_a), self.lora_b)


def with_adapters(module: nn.Module, adapters: dict[str, tuple[int, float]]) -> nn.Module:
    """`module` with each nn.Linear at a path in `adapters` ("" for `module` itself) replaced by a
    LoRALinear of that (rank, scale)."""
    for local, (rank, scale) in adapters.items():
        if not local:
            module = LoRALinear(module, rank, scale)
            continue
        *parents, leaf = local.split(".")
        owner = module.get_submodule(".".join(parents)) if parents else module
        setattr(owner, leaf, LoRALinear(getattr(owner, leaf), rank, scale))
    return module


def last_token(x: torch.Tensor, lengths: torch.Tensor) -> torch.Tensor:
    """x[b, lengths[b] - 1] for each row b of x [batch, seq, ...]. A gather rather than advanced
    indexing, so ONNX export gives one GatherElements; a length outside 1..seq raises."""
    index = (lengths.to(torch.long) - 1).reshape(-1, 1, *([1] * (x.dim() - 2)))
    index = index.expand(x.shape[0], 1, *x.shape[2:])
    return torch.gather(x, 1, index).squeeze(1)
