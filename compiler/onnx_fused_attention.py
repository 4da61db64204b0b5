"""Attention exported as onnxruntime's fused GroupQueryAttention kernel over a KV cache that is one
preallocated buffer per layer, updated in place.

The plain export (compiler/onnx_export.py) concatenates the past and the new keys into a new
`present` tensor at every call, so a decode step copies the whole cache. Here each layer's cache is
a buffer [batch, kv_heads, max_length, head_dim]: the kernel writes the new keys and values at each
row's own length and attends over that row's keys only, so rows of different lengths share a batch
without padding, and when the caller binds `past_key_values.i.*` and `present.i.*` to the same
memory (onnxruntime's IO binding) nothing is copied. This is the layout onnxruntime-genai runs
("past_present_share_buffer").

The graph keeps the Optimum names. What changes is what they mean:

    attention_mask   int64 [batch, total]   row b has (its length after this call) ones; total is the
                                            longest such length. Only the counts matter.
    past_key_values.{i}.key / .value        float [batch, kv_heads, max_length, head_dim]
    present.{i}.key / .value                the same buffers, with the new positions written

A call whose sequence length equals `total` is a prompt: every row starts at position 0 (prompts of
different lengths are padded on the right). Any other call appends its tokens after each row's past.

The op is a torch custom op so that tracing sees one node; its eager implementation (a loop over
rows) is the reference the export is checked against and what runs if the module is called in torch.
"""
from __future__ import annotations

import math

import torch

DOMAIN = "com.microsoft"
NO_WINDOW, NO_SOFTCAP = -1, 0.0


@torch.library.custom_op("lmspec::group_query_attention", mutates_args=())
def group_query_attention(query: torch.Tensor, key: torch.Tensor, value: torch.Tensor, past_key: torch.Tensor,
                          past_value: torch.Tensor, attention_mask: torch.Tensor, heads: int, kv_heads: int,
                          scale: float, softcap: float, window: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """query [b, s, heads*d], key/value [b, s, kv_heads*d], past [b, kv_heads, max_length, d] ->
    (output [b, s, heads*d], present key, present value)."""
    b, s, _ = query.shape
    d = past_key.shape[-1]
    q = query.view(b, s, heads, d).transpose(1, 2)
    k = key.view(b, s, kv_heads, d).transpose(1, 2)
    v = value.view(b, s, kv_heads, d).transpose(1, 2)
    present_key, present_value = past_key.clone(), past_value.clone()
    out = torch.zeros_like(q)
    prompt = s == attention_mask.shape[1]
    for row in range(b):
        length = int(attention_mask[row].sum())
        start = 0 if prompt else length - s
        new = min(s, length - start)  # a prompt row shorter than s leaves the rest as padding
        present_key[row, :, start:start + new] = k[row, :, :new]
        present_value[row, :, start:start + new] = v[row, :, :new]
        keys = present_key[row, :, :start + new].repeat_interleave(heads // kv_heads, dim=0)
        values = present_value[row, :, :start + new].repeat_interleave(heads // kv_heads, dim=0)
        scores = (q[row, :, :new].float() @ keys.float().transpose(-1, -2)) * scale
        if softcap:
            scores = softcap * torch.tanh(scores / softcap)
        query_at = torch.arange(start, start + new)[:, None]
        key_at = torch.arange(start + new)[None, :]
        visible = key_at <= query_at
        if window != NO_WINDOW:
            visible = visible & (query_at - key_at < window)
        scores = scores.masked_fill(~visible, float("-inf"))
        out[row, :, :new] = (scores.softmax(-1) @ values.float()).to(out.dtype)
    return out.transpose(1, 2).reshape(b, s, heads * d), present_key, present_value


@group_query_attention.register_fake
def _(query, key, value, past_key, past_value, attention_mask, heads, kv_heads, scale, softcap, window):
    return torch.empty_like(query), torch.empty_like(past_key), torch.empty_like(past_value)


class SharedBufferCache:
    """The cache a lowered model sees while the shared-buffer decoder is traced (or run in torch):
    its attention layers call `attend` instead of attending themselves."""

    def __init__(self, past: list[tuple[torch.Tensor, torch.Tensor]], attention_mask: torch.Tensor,
                 position_ids: torch.Tensor):
        self.past, self.attention_mask, self.position_ids = past, attention_mask, position_ids
        self.present: list[tuple[torch.Tensor, torch.Tensor]] = []

    def attend(self, layer, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        """q [b, heads, t, d], k and v [b, kv_heads, t, d] (after RoPE and QK-norm) -> [b, t, heads*d]."""
        cfg = layer.cfg
        b, _, t, d = q.shape
        past_key, past_value = self.past[layer.layer_index]
        scale = cfg.scale if cfg.scale is not None else 1.0 / math.sqrt(d)
        out, present_key, present_value = group_query_attention(
            _flat(q), _flat(k), _flat(v), past_key, past_value, self.attention_mask, layer.heads, layer.kv_heads,
            float(scale), float(cfg.softcap or NO_SOFTCAP), cfg.window if cfg.window is not None else NO_WINDOW)
        self.present.append((present_key, present_value))
        return out


def _flat(x: torch.Tensor) -> torch.Tensor:
    b, h, t, d = x.shape
    return x.transpose(1, 2).reshape(b, t, h * d)


def why_not_fused(model: torch.nn.Module) -> str | None:
    """Why this model's attention cannot run as the fused kernel, or None when it can."""
    from .torch_modules import Attention

    for module in model.modules():
        if isinstance(module, Attention) and not module.cfg.causal:
            return f"attention layer {module.layer_index} is not causal; the fused kernel always is"
    return None


def onnx_translation() -> dict:
    """The exporter's custom translation table entry: the op as com.microsoft::GroupQueryAttention,
    with each row's length (seqlens_k, minus one as the kernel wants it) and the total length
    computed from the attention mask in the graph, as onnxruntime-genai's models do."""
    import onnx
    from onnxscript import opset20 as op
    from onnxscript.values import Opset

    _register_schema()
    microsoft = Opset(DOMAIN, 1)

    def translation(query, key, value, past_key, past_value, attention_mask, heads: int, kv_heads: int,
                    scale: float, softcap: float, window: int):
        lengths = op.ReduceSum(attention_mask, op.Constant(value_ints=[1]), keepdims=0)
        seqlens_k = op.Cast(op.Sub(lengths, op.Constant(value_int=1)), to=onnx.TensorProto.INT32)
        total = op.Cast(op.Gather(op.Shape(attention_mask), op.Constant(value_int=1)), to=onnx.TensorProto.INT32)
        return microsoft.GroupQueryAttention(
            query, key, value, past_key, past_value, seqlens_k, total, num_heads=heads, kv_num_heads=kv_heads,
            scale=scale, softcap=softcap, local_window_size=window if window != NO_WINDOW else -1)

    return {torch.ops.lmspec.group_query_attention.default: translation}


def _register_schema() -> None:
    """Tell onnx (and so the exporter) the op's signature; onnxruntime has its own definition."""
    from onnx import defs

    if defs.has(  # registered once per process
            "GroupQueryAttention", DOMAIN):
        return
    formal = defs.OpSchema.FormalParameter
    attribute, kind = defs.OpSchema.Attribute, defs.OpSchema.AttrType
    schema = defs.OpSchema(
        "GroupQueryAttention", DOMAIN, 1,
        inputs=[formal("query", "T"), formal("key", "T"), formal("value", "T"), formal("past_key", "T"),
                formal("past_value", "T"), formal("seqlens_k", "M"), formal("total_sequence_length", "M")],
        outputs=[formal("output", "T"), formal("present_key", "T"), formal("present_value", "T")],
        type_constraints=[("T", ["tensor(float)", "tensor(float16)"], ""), ("M", ["tensor(int32)"], "")],
        attributes=[attribute("num_heads", kind.INT, ""), attribute("kv_num_heads", kind.INT, ""),
                    attribute("scale", kind.FLOAT, ""), attribute("softcap", kind.FLOAT, ""),
                    attribute("local_window_size", kind.INT, "")])
    defs.register_schema(schema)
