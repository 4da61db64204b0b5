"""Self-attention as one op, so lowering can use fused kernels and the KV cache, and export can
give the cache explicit inputs and outputs. Its options cover GPT-2 to Llama, Mistral and Qwen:
grouped-query heads, a head size of its own, rotary positions (partial, with Llama-3 or linear
frequency scaling), QK-norm, a sliding window, soft-capped scores."""
from __future__ import annotations

from ..registry import Arg, Op, OpError, register
from ..shapes import fmt_shape
from .core import _float_input
from .layers import _last_dim

ROPE_SCALINGS = ("linear", "llama3")
QK_NORM_SCOPES = ("head", "projection")  # QK-norm of each head (Qwen3), or of the whole q and k (OLMo 2)


@register
class Attention(Op):
    name = "attention"
    short = "attn"
    residual = "proj.weight"
    matrices = ("qkv", "proj")
    args = (
        Arg("x", "tensor"), Arg("heads", "int"), Arg("kv_heads", "int", None), Arg("causal", "bool", True),
        Arg("bias", "bool", True), Arg("dropout", "float", 0.0), Arg("head_dim", "int", None),
        Arg("out_bias", "bool", None),
        Arg("rope", "bool", False), Arg("rope_theta", "float", 10000.0), Arg("rotary_dim", "int", None),
        Arg("rope_scaling", "str", None, ROPE_SCALINGS), Arg("rope_factor", "float", 1.0),
        Arg("rope_low", "float", 1.0), Arg("rope_high", "float", 4.0), Arg("rope_original", "int", None),
        Arg("qk_norm", "bool", False), Arg("qk_norm_eps", "float", 1e-6), Arg("qk_norm_offset", "float", 0.0),
        Arg("qk_norm_scope", "str", "head", QK_NORM_SCOPES),
        Arg("window", "int", None), Arg("softcap", "float", None), Arg("scale", "float", None),
    )
    doc = ("Self-attention over [batch, seq, dim]: fused q/k/v projection, `heads` query heads sharing "
           "`kv_heads` key/value heads (grouped-query; 1 is multi-query), each `head_dim` wide (default "
           "dim / heads); `rope` rotary positions (`rope_theta`, `rotary_dim` for partial rotation, "
           "`rope_scaling` \"llama3\" with `rope_factor`, `rope_low`, `rope_high`, `rope_original`, or "
           "\"linear\"); `qk_norm` RMSNorm of each query and key head; `window` keys seen per query "
           "(sliding window); `softcap` c*tanh(scores/c); `scale` (default 1/sqrt(head_dim)); `qk_norm_offset` "
           "1.0 scales the QK-norm by 1 + weight (Gemma 3); `qk_norm_scope` \"projection\" normalises the whole q "
           "and k projections rather than each head (OLMo 2); `bias` on "
           "q/k/v and `out_bias` (default: `bias`) on the output projection.")
    onnx = "MatMul/Softmax subgraph with past/present KV"
    autocast = "lower"

    def geometry(self, c) -> tuple[int, int, int, int]:
        d = _last_dim(c)
        heads = c["heads"]
        kv = c["kv_heads"] if c["kv_heads"] is not None else heads
        if heads < 1:
            raise OpError(f"heads must be positive, got {heads}", "heads")
        if c["head_dim"] is None and d % heads:
            raise OpError(f"dim {d} is not divisible by {heads} heads (or give head_dim)", "heads")
        if kv < 1 or heads % kv:
            raise OpError(f"{heads} heads are not divisible into {kv} kv_heads groups", "kv_heads")
        hd = c["head_dim"] if c["head_dim"] is not None else d // heads
        if hd < 1:
            raise OpError(f"head_dim must be positive, got {hd}", "head_dim")
        return d, heads, kv, hd

    def infer(self, c):
        _float_input(c)
        if len(c.shape("x")) != 3:
            raise OpError(f"expects [batch, seq, dim], got {fmt_shape(c.shape('x'))}", "x")
        _, _, _, hd = self.geometry(c)
        if not 0.0 <= c["dropout"] < 1.0:
            raise OpError(f"dropout must be in [0, 1), got {c['dropout']}", "dropout")
        self._check_rope(c, hd)
        if c["window"] is not None and c["window"] < 1:
            raise OpError(f"window must be positive, got {c['window']}", "window")
        for name in ("softcap", "scale", "qk_norm_eps"):
            if c[name] is not None and c[name] <= 0:
                raise OpError(f"{name} must be positive, got {c[name]}", name)
        return c.shape("x"), c.dtype("x")

    def _check_rope(self, c, hd: int) -> None:
        if not c["rope"]:
            return
        rot = c["rotary_dim"] if c["rotary_dim"] is not None else hd
        if rot < 2 or rot > hd or rot % 2:
            raise OpError(f"rotary_dim must be even and at most head_dim {hd}, got {rot}", "rotary_dim")
        if c["rope_theta"] <= 0:
            raise OpError(f"rope_theta must be positive, got {c['rope_theta']}", "rope_theta")
        scaling = c["rope_scaling"]
        if scaling is not None and scaling not in ROPE_SCALINGS:
            raise OpError(f"rope_scaling must be one of {', '.join(map(repr, ROPE_SCALINGS))}, got {scaling!r}",
                          "rope_scaling")
        if scaling is not None and not c["rope_factor"] > 0:  # both scalings divide frequencies by it
            raise OpError(f"rope_factor must be positive, got {c['rope_factor']}", "rope_factor")
        if scaling == "llama3":
            if c["rope_original"] is None:
                raise OpError("rope_scaling=\"llama3\" needs rope_original (the pre-training context)",
                              "rope_original")
            if not c["rope_original"] > 0:
                raise OpError(f"rope_original must be positive, got {c['rope_original']}", "rope_original")
            if not 0 < c["rope_low"] < c["rope_high"]:
                raise OpError(f"need 0 < rope_low < rope_high, got {c['rope_low']} and {c['rope_high']}",
                              "rope_low")

    def params(self, c):
        d, heads, kv, hd = self.geometry(c)
        p = {"qkv.weight": ((heads + 2 * kv) * hd, d)}
        if c["bias"]:
            p["qkv.bias"] = ((heads + 2 * kv) * hd,)
        p["proj.weight"] = (d, heads * hd)
        if self._out_bias(c):
            p["proj.bias"] = (d,)
        if c["qk_norm"]:
            whole = c["qk_norm_scope"] == "projection"
            p["q_norm.weight"] = (heads * hd,) if whole else (hd,)
            p["k_norm.weight"] = (kv * hd,) if whole else (hd,)
        return p

    @staticmethod
    def _out_bias(c) -> bool:
        return c["bias"] if c["out_bias"] is None else c["out_bias"]

    def init(self, param, args):
        if param.endswith("norm.weight"):  # stored as scale - offset: the norm starts as the identity
            return ("fill", 1.0 - args.get("qk_norm_offset", 0.0))
        return super().init(param, args)

    def flops(self, f):
        batch, seq, d = f.in_shapes["x"]
        qkv_out = f.params["qkv.weight"][0]
        inner = f.params["proj.weight"][1]  # heads * head_dim
        tokens = batch * seq
        projections = 2 * tokens * d * qkv_out + 2 * tokens * inner * d
        seen = min(seq, f.args["window"]) if f.args.get("window") else seq
        scores_and_mix = 2 * 2 * batch * seq * seen * inner  # QK^T and AV over all heads
        return projections + scores_and_mix

    def lower(self, c):
        from ..torch_modules import Attention as A, AttentionConfig
        d, heads, kv, hd = self.geometry(c.spec)
        options = {name: c.spec[name] for name in (
            "causal", "bias", "dropout", "rope", "rope_theta", "rotary_dim", "rope_scaling", "rope_factor",
            "rope_low", "rope_high", "rope_original", "qk_norm", "qk_norm_eps", "qk_norm_offset", "qk_norm_scope",
            "window", "softcap", "scale")}
        cfg = AttentionConfig(d, heads, kv, hd, out_bias=self._out_bias(c.spec), **options)
        return c.module(A(cfg, layer_index=c.attention_index()), c["x"], c.cache)

    def saved_for_backward(self, s):
        b, t, _ = s.in_shapes["x"]
        _, heads, kv, hd = self.geometry(s)
        # x for the q/k/v projection and its output (q, k, v are views of it); RoPE and QK-norm make
        # new q and k (and QK-norm keeps 1/rms per head)
        keep = [s.input("x", cast=True), s.new((b, t, (heads + 2 * kv) * hd))]
        if s["rope"] or s["qk_norm"]:
            keep += [s.new((b, heads, t, hd)), s.new((b, kv, t, hd))]
        if s["qk_norm"]:
            keep += [s.new((b, t, heads, 1), "f32"), s.new((b, t, kv, 1), "f32")]
        if s["softcap"] is None:
            # fused scaled_dot_product_attention keeps q, k, v, its output and the log-sum-exp
            # [b, heads, t], never the [t, t] scores; a sliding window adds its mask as a bias
            keep.append(s.new((b, heads, t), "f32"))
            if s["window"] is not None:
                keep.append(s.new((t, t), "compute"))
        else:
            # soft-capped scores take the plain path, which keeps [b, heads, t, t] tensors: the capped
            # scores (tanh's output), the f32 softmax (and its 16-bit copy), the dropout mask
            scores = (b, heads, t, t)
            keep += [s.new((b, heads, t, hd)), s.new(scores), s.new((t, t), "bool"), s.new(scores, "f32")]
            if kv != heads:  # k and v repeated for every query head
                keep += [s.new((b, heads, t, hd)), s.new((b, heads, t, hd))]
            if s.mixed:
                keep.append(s.new(scores))
            if s["dropout"]:
                keep.append(s.new(scores, "bool"))
        return keep + [s.new((b, t, heads * hd))]  # the heads' output, which the out projection keeps
