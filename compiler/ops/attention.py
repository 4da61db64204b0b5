"""Multi-head causal self-attention as one op, so lowering can use fused kernels and the KV cache."""
from __future__ import annotations

from ..registry import Arg, Op, OpError, register
from ..shapes import fmt_shape
from .core import _float_input
from .layers import _last_dim


@register
class Attention(Op):
    name = "attention"
    short = "attn"
    residual = "proj.weight"
    args = (
        Arg("x", "tensor"), Arg("heads", "int"), Arg("kv_heads", "int", None), Arg("causal", "bool", True),
        Arg("bias", "bool", True), Arg("dropout", "float", 0.0),
    )
    doc = ("Self-attention over [batch, seq, dim]: fused qkv projection, heads (and kv_heads for grouped-query "
           "attention), scaled dot-product, output projection.")
    onnx = "MatMul/Softmax subgraph with past/present KV; fused to Attention by onnxruntime"

    def geometry(self, c) -> tuple[int, int, int, int]:
        d = _last_dim(c)
        heads = c["heads"]
        kv = c["kv_heads"] if c["kv_heads"] is not None else heads
        if heads < 1:
            raise OpError(f"heads must be positive, got {heads}", "heads")
        if d % heads:
            raise OpError(f"dim {d} is not divisible by {heads} heads", "heads")
        if kv < 1 or heads % kv:
            raise OpError(f"{heads} heads are not divisible into {kv} kv_heads groups", "kv_heads")
        return d, heads, kv, d // heads

    def infer(self, c):
        _float_input(c)
        if len(c.shape("x")) != 3:
            raise OpError(f"expects [batch, seq, dim], got {fmt_shape(c.shape('x'))}", "x")
        self.geometry(c)
        if not 0.0 <= c["dropout"] < 1.0:
            raise OpError(f"dropout must be in [0, 1), got {c['dropout']}", "dropout")
        return c.shape("x"), c.dtype("x")

    def params(self, c):
        d, heads, kv, hd = self.geometry(c)
        p = {"qkv.weight": ((heads + 2 * kv) * hd, d)}
        if c["bias"]:
            p["qkv.bias"] = ((heads + 2 * kv) * hd,)
        p["proj.weight"] = (d, d)
        if c["bias"]:
            p["proj.bias"] = (d,)
        return p

    def flops(self, f):
        batch, seq, d = f.in_shapes["x"]
        qkv_out = f.params["qkv.weight"][0]
        tokens = batch * seq
        projections = 2 * tokens * d * qkv_out + 2 * tokens * d * d
        scores_and_mix = 2 * 2 * batch * seq * seq * d  # QK^T and AV over all heads
        return projections + scores_and_mix

    def lower(self, c):
        from ..torch_modules import Attention as A
        d, heads, kv, _ = self.geometry(c.spec)
        m = A(d, heads, kv, c["causal"], c["bias"], c["dropout"], layer_index=c.attention_index())
        return c.module(m, c["x"], c.cache)
