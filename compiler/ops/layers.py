"""Ops that own weights: embedding, learned position, linear, norms, the MLP."""
from __future__ import annotations

from ..registry import Arg, Op, OpError, register
from ..shapes import fmt_dim, fmt_shape
from .core import ACTIVATIONS, _float_input

_INT = {"i32", "i64"}


def _last_dim(c, name="x") -> int:
    shape = c.shape(name)
    if not shape:
        raise OpError("expects a tensor of rank >= 1", name)
    d = shape[-1]
    if not isinstance(d, int):
        raise OpError(f"the feature dim must be a concrete size, got {fmt_dim(d)}", name)
    return d


def _leading(shape) -> int:
    """How many vectors a [..., d] tensor holds: the product of its leading dims (tokens)."""
    n = 1
    for d in shape[:-1]:
        n *= d
    return n


def _check_act(c) -> None:
    if c["act"] not in ACTIVATIONS:
        raise OpError(f"act must be one of {', '.join(ACTIVATIONS)}, got {c['act']}", "act")


def _positive(c, *names):
    for n in names:
        if c[n] < 1:
            raise OpError(f"'{n}' must be positive, got {c[n]}", n)


@register
class Embedding(Op):
    name = "embedding"
    short = "emb"
    args = (Arg("ids", "tensor"), Arg("num", "int"), Arg("dim", "int"))
    doc = "Look up rows of a [num, dim] table by integer ids."
    onnx = "Gather"
    autocast = "f32"

    def infer(self, c):
        if c.dtype("ids") not in _INT:
            raise OpError(f"ids must be an integer tensor, got {c.dtype('ids')}", "ids")
        _positive(c, "num", "dim")
        return (*c.shape("ids"), c["dim"]), "f32"

    def params(self, c):
        return {"weight": (c["num"], c["dim"])}

    def lower(self, c):
        import torch
        return c.module(torch.nn.Embedding(c["num"], c["dim"]), c["ids"])

    def saved_for_backward(self, s):
        return [s.input("ids")]


@register
class Position(Op):
    name = "position"
    short = "pos"
    args = (Arg("seq", "dim"), Arg("context", "int"), Arg("dim", "int"))
    doc = "Learned absolute position embeddings for positions 0..seq-1 (offset by the KV cache)."
    onnx = "Gather of the table at position_ids (left padding gives each row its own positions)"
    autocast = "f32"

    def infer(self, c):
        _positive(c, "context", "dim")
        bound = c.bound(c["seq"])
        if bound is None:
            raise OpError(f"the length {fmt_dim(c['seq'])} has no upper bound; declare it like "
                          f"`seq <= {c['context']}` in the input", "seq")
        if bound > c["context"]:
            raise OpError(f"{fmt_dim(c['seq'])} may be up to {bound}, more than the {c['context']} "
                          f"positions of the table", "seq")
        return (c["seq"], c["dim"]), "f32"

    def params(self, c):
        return {"weight": (c["context"], c["dim"])}

    def lower(self, c):
        from ..torch_modules import Position as P
        return c.module(P(c["context"], c["dim"]), c.dim(c.spec["seq"]), c.cache)

    def saved_for_backward(self, s):
        return []  # a slice of the table


@register
class Linear(Op):
    name = "linear"
    short = "linear"
    matrices = ("",)
    args = (Arg("x", "tensor"), Arg("out", "int"), Arg("bias", "bool", True), Arg("tie", "node", None))
    doc = "x @ W.T + b with W [out, in]; `tie=node` shares W with another node's weight (e.g. the embedding)."
    onnx = "MatMul + Add (Gemm when 2-D)"
    autocast = "lower"

    def infer(self, c):
        _float_input(c)
        _last_dim(c)
        _positive(c, "out")
        return (*c.shape("x")[:-1], c["out"]), c.dtype("x")

    def params(self, c):
        p = {"weight": (c["out"], _last_dim(c))}
        if c["bias"]:
            p["bias"] = (c["out"],)
        return p

    def ties(self, c):
        target = c["tie"]
        if target is None:
            return {}
        owner = c.node_params(target)
        if "weight" not in owner:
            raise OpError("can only tie to a node that owns a 'weight' (an embedding or linear)", "tie")
        want = (c["out"], _last_dim(c))
        if tuple(owner["weight"]) != want:
            raise OpError(f"tied weight {fmt_shape(owner['weight'])} of '{c.node_module(target)}' does not "
                          f"match this linear's weight {fmt_shape(want)}", "tie")
        return {"weight": f"{c.node_module(target)}.weight"}

    def flops(self, f):
        w = f.params["weight"]
        return 2 * _leading(f.in_shapes["x"]) * w[0] * w[1]

    def lower(self, c):
        import torch
        m = torch.nn.Linear(_last_dim(c.spec), c["out"], bias=c["bias"])
        tied = c.tied("weight")
        if tied is not None:
            m.weight = tied
        return c.module(m, c["x"])

    def saved_for_backward(self, s):
        return [s.input("x", cast=True)]


class _Norm(Op):
    autocast = "f32"

    def _stats(self, s):
        return s.new((*s.in_shapes["x"][:-1], 1), "f32")  # per-vector mean or 1/rms

    def infer(self, c):
        _float_input(c)
        _last_dim(c)
        if c["eps"] <= 0:
            raise OpError(f"eps must be positive, got {c['eps']}", "eps")
        return c.shape("x"), c.dtype("x")

    def init(self, param, args):
        # A norm with an offset (Gemma's 1 + w) stores w - offset: it starts as the identity too.
        return ("zeros", 0.0) if param == "bias" else ("fill", 1.0 - args.get("offset", 0.0))


@register
class LayerNorm(_Norm):
    name = "layernorm"
    short = "ln"
    args = (Arg("x", "tensor"), Arg("eps", "float", 1e-5), Arg("bias", "bool", True), Arg("affine", "bool", True))
    doc = ("Layer normalisation over the last dim, with a learned scale (and bias); `affine=false` learns "
           "neither (OLMo's norm without parameters).")
    onnx = "LayerNormalization (opset 17)"

    def params(self, c):
        d = _last_dim(c)
        if not c["affine"]:
            return {}
        return {"weight": (d,), "bias": (d,)} if c["bias"] else {"weight": (d,)}

    def lower(self, c):
        import torch
        affine = c["affine"]
        return c.module(torch.nn.LayerNorm(_last_dim(c.spec), eps=c["eps"], elementwise_affine=affine,
                                           bias=c["bias"] and affine), c["x"])

    def saved_for_backward(self, s):
        return [s.input("x", cast=True), self._stats(s), self._stats(s)]  # x, mean, 1/std


@register
class RMSNorm(_Norm):
    name = "rmsnorm"
    short = "norm"
    args = (Arg("x", "tensor"), Arg("eps", "float", 1e-6), Arg("offset", "float", 0.0))
    doc = ("Root-mean-square normalisation over the last dim, with a learned scale; `offset=1.0` scales by "
           "1 + weight (Gemma).")
    onnx = "SimplifiedLayerNormalization (fused by onnxruntime) or Pow/ReduceMean/Sqrt"

    def params(self, c):
        return {"weight": (_last_dim(c),)}

    def lower(self, c):
        import torch
        if c["offset"] == 0.0:
            return c.module(torch.nn.RMSNorm(_last_dim(c.spec), eps=c["eps"]), c["x"])
        from ..torch_modules import OffsetRMSNorm
        return c.module(OffsetRMSNorm(_last_dim(c.spec), c["eps"], c["offset"]), c["x"])

    def saved_for_backward(self, s):
        # x and 1/rms (CUDA's fused kernel; CPU's composite one also keeps the normalised x), and
        # with an offset the normalised x that multiplies (offset + weight)
        keep = [s.input("x", cast=True), self._stats(s)]
        return keep + [s.new(s.in_shapes["x"], "f32")] if s["offset"] else keep


@register
class MLP(Op):
    name = "mlp"
    short = "mlp"
    residual = "proj.weight"
    matrices = ("fc", "proj")
    args = (Arg("x", "tensor"), Arg("hidden", "int"), Arg("act", "func", "gelu", ACTIVATIONS),
            Arg("bias", "bool", True), Arg("gated", "bool", False))
    doc = ("Feed-forward: proj(act(fc(x))), fc [hidden, d], proj [d, hidden]. `gated=true` is a GLU "
           "(SwiGLU with act=silu, GeGLU with gelu): fc [2*hidden, d] holds gate then up, "
           "proj(act(gate(x)) * up(x)).")
    onnx = "MatMul + activation (+ Mul for a GLU) + MatMul"
    autocast = "lower"

    def infer(self, c):
        _float_input(c)
        _last_dim(c)
        _positive(c, "hidden")
        _check_act(c)
        return c.shape("x"), c.dtype("x")

    def params(self, c):
        d, h = _last_dim(c), c["hidden"]
        fc = 2 * h if c["gated"] else h
        if not c["bias"]:
            return {"fc.weight": (fc, d), "proj.weight": (d, h)}
        return {"fc.weight": (fc, d), "fc.bias": (fc,), "proj.weight": (d, h), "proj.bias": (d,)}

    def flops(self, f):
        fc, d = f.params["fc.weight"]
        h = f.params["proj.weight"][1]
        return 2 * _leading(f.in_shapes["x"]) * (fc + h) * d

    def lower(self, c):
        from ..torch_modules import MLP as M
        return c.module(M(_last_dim(c.spec), c["hidden"], c["act"], c["bias"], c["gated"]), c["x"])

    def saved_for_backward(self, s):
        lead, h = s.in_shapes["x"][:-1], s["hidden"]
        hidden = s.new((*lead, h))
        if s["gated"]:  # fc's output (gate and up are views of it), act(gate), act(gate) * up
            return [s.input("x", cast=True), s.new((*lead, 2 * h)), hidden, s.new((*lead, h))]
        if s["act"] == "relu":  # relu keeps its output, which proj keeps too
            return [s.input("x", cast=True), hidden]
        return [s.input("x", cast=True), s.new((*lead, h)), hidden]  # fc's output (act's input), act's output
