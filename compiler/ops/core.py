"""Ops without weights: elementwise arithmetic, activations, and the primitives that let a
spec write attention by hand (matmul, reshape, transpose, split, softmax, causal_mask)."""
from __future__ import annotations

import operator

from ..registry import Arg, Op, OpError, register
from ..shapes import broadcast, dim_div, fmt_dim, fmt_shape, is_dim, prod
from ..values import TensorRef

_FLOAT = {"f16", "bf16", "f32", "f64"}


def _float_input(c, name="x"):
    if c.dtype(name) not in _FLOAT:
        raise OpError(f"expects a floating-point tensor, got {c.dtype(name)}", name)


def _axis(axis: int, rank: int, arg: str) -> int:
    if not -rank <= axis < rank:
        raise OpError(f"axis {axis} is out of range for a rank-{rank} tensor", arg)
    return axis % rank


@register
class Input(Op):
    name = "input"
    args = (Arg("name", "str"),)
    doc = "A model input (declared with `input`)."

    def infer(self, c):
        raise OpError("inputs are declared with `input`")

    def lower(self, c):
        return c.placeholder(c["name"])


class _Elementwise(Op):
    args = (Arg("x", "tensor_or_scalar"), Arg("y", "tensor_or_scalar"))
    fn = None
    onnx = "Add/Sub/Mul/Div with numpy broadcasting"

    def infer(self, c):
        x, y = c["x"], c["y"]
        if isinstance(x, TensorRef) and isinstance(y, TensorRef):
            shape = broadcast(x.shape, y.shape)
            if shape is None:
                raise OpError(f"shapes {fmt_shape(x.shape)} and {fmt_shape(y.shape)} differ")
            if x.dtype != y.dtype:
                raise OpError(f"dtypes {x.dtype} and {y.dtype} differ")
            return shape, x.dtype
        t = x if isinstance(x, TensorRef) else y
        return t.shape, t.dtype

    def lower(self, c):
        return c.function(self.fn, c["x"], c["y"])


@register
class Add(_Elementwise):
    name, fn, doc = "add", operator.add, "x + y, with broadcasting."

    def saved_for_backward(self, s):
        return []  # the gradient passes through


@register
class Sub(_Elementwise):
    name, fn, doc = "sub", operator.sub, "x - y, with broadcasting."

    def saved_for_backward(self, s):
        return []


@register
class Mul(_Elementwise):
    name, fn, doc = "mul", operator.mul, "x * y, with broadcasting."

    def saved_for_backward(self, s):
        return super().saved_for_backward(s) if len(s.in_shapes) == 2 else []  # x * 2.0 keeps nothing


@register
class Div(_Elementwise):
    name, fn, doc = "div", operator.truediv, "x / y, with broadcasting."

    def saved_for_backward(self, s):
        return super().saved_for_backward(s) if "y" in s.in_shapes else []  # x / 2.0 keeps nothing


class _Activation(Op):
    args = (Arg("x", "tensor"),)

    def infer(self, c):
        _float_input(c)
        return c.shape("x"), c.dtype("x")

    def lower(self, c):
        import torch.nn.functional as F
        return c.function(getattr(F, self.torch_name), c["x"], **self.torch_kwargs)

    torch_kwargs: dict = {}


@register
class Gelu(_Activation):
    name, torch_name, doc = "gelu", "gelu", "GELU with the exact erf form."
    onnx = "Gelu (opset 20) or Erf-based decomposition"


@register
class GeluTanh(_Activation):
    name, torch_name, doc = "gelu_tanh", "gelu", "GELU with the tanh approximation (GPT-2's 'gelu_new')."
    torch_kwargs = {"approximate": "tanh"}
    onnx = "Tanh-based decomposition; fused to FastGelu by onnxruntime"


@register
class Silu(_Activation):
    name, torch_name, doc = "silu", "silu", "x * sigmoid(x)."


@register
class Relu(_Activation):
    name, torch_name, doc = "relu", "relu", "max(x, 0)."

    def saved_for_backward(self, s):
        return [s.output()]


ACTIVATIONS = ("gelu", "gelu_tanh", "silu", "relu")


@register
class Softmax(Op):
    name = "softmax"
    args = (Arg("x", "tensor"), Arg("dim", "int", -1))
    doc = "Softmax along `dim`."
    autocast = "f32"

    def infer(self, c):
        _float_input(c)
        _axis(c["dim"], len(c.shape("x")), "dim")
        return c.shape("x"), c.dtype("x")

    def lower(self, c):
        import torch
        return c.function(torch.softmax, c["x"], dim=c["dim"])

    def saved_for_backward(self, s):
        return [s.output()]


@register
class Dropout(Op):
    name = "dropout"
    short = "dropout"
    args = (Arg("x", "tensor"), Arg("p", "float", 0.0))
    doc = "Zeroes elements with probability p while training."
    onnx = "dropped at export (inference mode)"

    def infer(self, c):
        if not 0.0 <= c["p"] < 1.0:
            raise OpError(f"probability must be in [0, 1), got {c['p']}", "p")
        return c.shape("x"), c.dtype("x")

    def lower(self, c):
        import torch
        if c["p"] == 0.0:
            return c["x"]  # dropout(x, 0) is x: emit nothing
        return c.module(torch.nn.Dropout(c["p"]), c["x"])

    def saved_for_backward(self, s):
        return [s.new(s.out_shapes[0], "bool")] if s["p"] else []  # the mask (CUDA's fused kernel: bool)


@register
class Matmul(Op):
    name = "matmul"
    args = (Arg("x", "tensor"), Arg("y", "tensor"))
    cache_safe = False
    doc = "Batched matrix product (x @ y), broadcasting the batch dims."
    onnx = "MatMul"
    autocast = "lower"

    def infer(self, c):
        a, b = c.shape("x"), c.shape("y")
        if len(a) < 2 or len(b) < 2:
            raise OpError(f"needs two tensors of rank >= 2, got {fmt_shape(a)} and {fmt_shape(b)}")
        if a[-1] != b[-2]:
            raise OpError(f"inner dims differ: {fmt_shape(a)} @ {fmt_shape(b)} "
                          f"({fmt_dim(a[-1])} vs {fmt_dim(b[-2])})")
        batch = broadcast(a[:-2], b[:-2])
        if batch is None:
            raise OpError(f"batch dims of {fmt_shape(a)} and {fmt_shape(b)} do not broadcast")
        if c.dtype("x") != c.dtype("y"):
            raise OpError(f"dtypes {c.dtype('x')} and {c.dtype('y')} differ")
        return (*batch, a[-2], b[-1]), c.dtype("x")

    def flops(self, f):
        out = f.out_shapes[0]
        n = 1
        for d in out:
            n *= d
        return 2 * n * f.in_shapes["x"][-1]

    def lower(self, c):
        return c.function(operator.matmul, c["x"], c["y"])

    def saved_for_backward(self, s):
        return [s.input("x", cast=True), s.input("y", cast=True)]  # scores included, when it makes them


@register
class Reshape(Op):
    name = "reshape"
    args = (Arg("x", "tensor"), Arg("shape", "dims"))
    doc = "View with a new shape; one dim may be -1."
    onnx = "Reshape"

    def infer(self, c):
        src, target = c.shape("x"), list(c["shape"])
        holes = [i for i, d in enumerate(target) if d == -1]
        if len(holes) > 1:
            raise OpError("at most one -1 in a shape", "shape")
        if any(isinstance(d, int) and d < 1 and d != -1 for d in target):
            raise OpError(f"dims must be positive, got {fmt_shape(target)}", "shape")
        known = prod([d for d in target if d != -1])
        total = prod(src)
        if holes:
            rest = dim_div(total, known)
            if rest is None:
                raise OpError(f"cannot reshape {fmt_shape(src)} to {fmt_shape(target)}", "shape")
            target[holes[0]] = rest
        elif known != total:
            raise OpError(f"cannot reshape {fmt_shape(src)} ({fmt_dim(total)} elements) to "
                          f"{fmt_shape(target)} ({fmt_dim(known)} elements)", "shape")
        return tuple(target), c.dtype("x")

    def lower(self, c):
        return c.method("reshape", c["x"], *[c.dim(d) for d in c.spec["shape"]])

    def saved_for_backward(self, s):
        return []


@register
class Transpose(Op):
    name = "transpose"
    args = (Arg("x", "tensor"), Arg("dim0", "int"), Arg("dim1", "int"))
    doc = "Swap two axes."
    onnx = "Transpose"

    def infer(self, c):
        shape = list(c.shape("x"))
        a = _axis(c["dim0"], len(shape), "dim0")
        b = _axis(c["dim1"], len(shape), "dim1")
        shape[a], shape[b] = shape[b], shape[a]
        return tuple(shape), c.dtype("x")

    def lower(self, c):
        import torch
        return c.function(torch.transpose, c["x"], c["dim0"], c["dim1"])

    def saved_for_backward(self, s):
        return []


@register
class Split(Op):
    name = "split"
    args = (Arg("x", "tensor"), Arg("parts", "any"), Arg("dim", "int", -1))
    doc = "Split into `parts` equal pieces (an int) or pieces of the given sizes (a list), along `dim`."
    onnx = "Split"

    def _sizes(self, c):
        shape = c.shape("x")
        axis = _axis(c["dim"], len(shape), "dim")
        parts = c["parts"]
        if isinstance(parts, int) and not isinstance(parts, bool) and parts > 0:
            size = dim_div(shape[axis], parts)
            if size is None:
                raise OpError(f"dim {fmt_dim(shape[axis])} does not split into {parts} equal parts", "parts")
            return axis, [size] * parts
        if isinstance(parts, list) and parts and all(is_dim(p) for p in parts):
            total = parts[0]
            from ..shapes import dim_add
            for p in parts[1:]:
                total = dim_add(total, p)
                if total is None:
                    break
            if total != shape[axis]:
                raise OpError(f"sizes {fmt_shape(parts)} do not add up to dim {fmt_dim(shape[axis])}", "parts")
            return axis, list(parts)
        raise OpError("parts must be a positive int or a list of sizes", "parts")

    def infer(self, c):
        axis, sizes = self._sizes(c)
        shape = c.shape("x")
        return [(tuple(s if i == axis else d for i, d in enumerate(shape)), c.dtype("x")) for s in sizes]

    def lower(self, c):
        import torch
        axis, sizes = self._sizes(c.spec)
        whole = c.function(torch.split, c["x"], [c.dim(s) for s in sizes], dim=axis)
        return [c.function(operator.getitem, whole, i) for i in range(len(sizes))]

    def saved_for_backward(self, s):
        return []


@register
class CausalMask(Op):
    name = "causal_mask"
    args = (Arg("x", "tensor"),)
    cache_safe = False
    doc = "Fill scores [..., T, S] above the diagonal with -inf, so position t sees only s <= t."
    onnx = "Trilu + Where"

    def infer(self, c):
        _float_input(c)
        if len(c.shape("x")) < 2:
            raise OpError(f"needs scores of rank >= 2, got {fmt_shape(c.shape('x'))}", "x")
        return c.shape("x"), c.dtype("x")

    def lower(self, c):
        from .. import torch_modules
        return c.function(torch_modules.causal_mask, c["x"])

    def saved_for_backward(self, s):
        return [s.new(s.in_shapes["x"][-2:], "bool")]  # the [T, S] mask


@register
class Softcap(Op):
    name = "softcap"
    args = (Arg("x", "tensor"), Arg("cap", "float"))
    doc = "cap * tanh(x / cap): squashes logits smoothly into (-cap, cap) (Gemma 2's logit soft-capping)."
    onnx = "Div + Tanh + Mul"

    def infer(self, c):
        _float_input(c)
        if c["cap"] <= 0:
            raise OpError(f"cap must be positive, got {c['cap']}", "cap")
        return c.shape("x"), c.dtype("x")

    def lower(self, c):
        from .. import torch_modules
        return c.function(torch_modules.softcap, c["x"], c["cap"])

    def saved_for_backward(self, s):
        return [s.new(s.out_shapes[0])]  # tanh's output


@register
class LastToken(Op):
    name = "last_token"
    args = (Arg("x", "tensor"), Arg("lengths", "tensor"))
    # With a KV cache `x` holds only the new positions, so lengths counted from the start would miss.
    cache_safe = False
    doc = ("The vector at position lengths[b] - 1 of each row b of x [batch, seq, ...]: the last real "
           "token of a right-padded batch (a classification head reads it).")
    onnx = "Sub + Reshape + GatherElements along seq + Squeeze"

    def infer(self, c):
        x, lengths = c.shape("x"), c.shape("lengths")
        if len(x) < 2:
            raise OpError(f"needs x of rank >= 2 [batch, seq, ...], got {fmt_shape(x)}", "x")
        if c.dtype("lengths") not in ("i32", "i64"):
            raise OpError(f"lengths must be an integer tensor, got {c.dtype('lengths')}", "lengths")
        if tuple(lengths) != (x[0],):
            raise OpError(f"lengths must be [{fmt_dim(x[0])}] (one per row of x), got {fmt_shape(lengths)}",
                          "lengths")
        return (x[0], *x[2:]), c.dtype("x")

    def lower(self, c):
        from .. import torch_modules
        return c.function(torch_modules.last_token, c["x"], c["lengths"])

    def saved_for_backward(self, s):
        return [s.input("lengths")]  # the gather's index; the gradient scatters back into zeros
