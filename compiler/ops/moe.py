"""A mixture-of-experts feed-forward as one op: a router picks `top_k` of `experts` gated MLPs per token."""
from __future__ import annotations

from ..registry import Arg, Op, OpError, register
from .core import ACTIVATIONS, _float_input
from .layers import _check_act, _last_dim, _leading, _positive


@register
class MoE(Op):
    name = "moe"
    short = "moe"
    residual = "proj_weight"
    matrices = ("router",)  # the experts' stacked [experts, out, in] weights are no nn.Linear
    args = (Arg("x", "tensor"), Arg("experts", "int"), Arg("top_k", "int"), Arg("hidden", "int"),
            Arg("act", "func", "silu", ACTIVATIONS), Arg("norm_topk", "bool", True))
    doc = ("Mixture of experts (Qwen3-MoE, Mixtral): router [experts, d] scores each token, softmax, the "
           "`top_k` best experts run (each a gated MLP: fc_weight [experts, 2*hidden, d] holds gate then up, "
           "proj_weight [experts, d, hidden]) and their outputs are summed with the router's weights, "
           "renormalised over the chosen experts when `norm_topk`.")
    onnx = "every expert computed densely and weighted by the router (exact; sparse dispatch is eager only)"
    autocast = "lower"

    def infer(self, c):
        _float_input(c)
        _last_dim(c)
        _positive(c, "experts", "top_k", "hidden")
        if c["top_k"] > c["experts"]:
            raise OpError(f"top_k {c['top_k']} is more than the {c['experts']} experts", "top_k")
        _check_act(c)
        return c.shape("x"), c.dtype("x")

    def params(self, c):
        d, e, h = _last_dim(c), c["experts"], c["hidden"]
        return {"router.weight": (e, d), "fc_weight": (e, 2 * h, d), "proj_weight": (e, d, h)}

    def flops(self, f):
        e, d = f.params["router.weight"]
        h = f.params["proj_weight"][2]
        tokens = _leading(f.in_shapes["x"])
        return 2 * tokens * d * e + f.args["top_k"] * 2 * tokens * 3 * h * d  # router + active experts

    def lower(self, c):
        from ..torch_modules import MoE as M
        return c.module(M(_last_dim(c.spec), c["experts"], c["top_k"], c["hidden"], c["act"], c["norm_topk"]),
                        c["x"])

    def saved_for_backward(self, s):
        d, h = s.in_shapes["x"][-1], s["hidden"]
        routed = _leading(s.in_shapes["x"]) * s["top_k"]  # (token, expert) pairs
        return [s.input("x", cast=True), s.new((routed // s["top_k"], s["experts"]), "f32"),  # router probs
                # per expert: its tokens, fc's output, act's, the product, the output, the output weighted
                # (index_add_ keeps it); (token, slot) indices
                s.new((routed, d)), s.new((routed, 2 * h)), s.new((routed, h)), s.new((routed, h)),
                s.new((routed, d)), s.new((routed, d)), s.new((routed, 2), "i64")]
