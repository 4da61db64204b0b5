"""The op registry: the one place that knows about an op.

Each op is one class registered with `@register`, holding its argument signature, its shape
rule (`infer`), the parameters it owns, its FLOP count, what autograd keeps of it for the
backward pass, its lowering to torch.fx, and notes for ONNX export. Nothing here imports torch:
`lower` imports it when it is called, so that checking a spec stays fast.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, ClassVar

REQUIRED = object()


@dataclass(frozen=True)
class Arg:
    name: str
    kind: str  # tensor | int | float | bool | dim | dims | scalar | tensor_or_scalar | func | node | str | any
    default: Any = REQUIRED
    choices: tuple[str, ...] = ()  # the values a func or str option takes: the builder checks them, suggesting one


class OpError(Exception):
    """A mistake in how an op is used; `arg` names the argument to point the caret at."""

    def __init__(self, message: str, arg: str | None = None):
        super().__init__(message)
        self.arg = arg


class Op:
    name: ClassVar[str]
    args: ClassVar[tuple[Arg, ...]]
    short: ClassVar[str | None] = None  # scope name of the torch module, for ops that own one
    residual: ClassVar[str | None] = None  # parameter that projects back into the residual stream
    # The weight matrices the op applies as an nn.Linear, by module path inside the op's module ("" for
    # the op's module itself): where LoRA adapters may go (compiler/lora.py).
    matrices: ClassVar[tuple[str, ...]] = ()
    cache_safe: ClassVar[bool] = True  # False: mixes sequence positions in a way a KV cache cannot follow
    onnx: ClassVar[str] = ""  # how the op appears in an exported ONNX graph
    exportable: ClassVar[bool] = True  # False: `lmspec export` refuses the op, naming where it is used
    doc: ClassVar[str] = ""
    # Under mixed precision (torch.autocast): "lower" runs in 16-bit (matrix products), "f32" in float32
    # (norms, softmax), "promote" in the widest dtype of its inputs. Used by `lmspec plan`'s memory walk.
    autocast: ClassVar[str] = "promote"

    def infer(self, c) -> tuple[tuple, str] | list[tuple[tuple, str]]:
        """(shape, dtype) of the output, or a list of them; raise OpError on misuse."""
        raise NotImplementedError

    def params(self, c) -> dict[str, tuple]:
        """Shapes of the parameters this op owns, by their name inside its module."""
        return {}

    def ties(self, c) -> dict[str, str]:
        """Parameters shared with another node: local name -> full name of the owner's parameter."""
        return {}

    def init(self, param: str, args: dict) -> tuple[str, float]:
        """How to initialise a parameter (by its name inside the op's module): ("normal", std),
        ("fill", value) or ("zeros", 0). GPT-2's: weights normal(0, 0.02), biases zero."""
        if param.endswith("bias"):
            return ("zeros", 0.0)
        return ("normal", 0.02)

    def flops(self, f) -> int:
        """Forward FLOPs (a multiply-add counts 2) given concrete shapes in `f`; matrix products only."""
        return 0

    def saved_for_backward(self, s) -> list:
        """What autograd keeps of one call for the backward pass (activation memory, compiler/plan.py),
        built with `s`: `s.input(arg)` an input tensor (counted once however many ops keep it;
        `cast=True`: as the op computes with it, a fresh 16-bit copy when autocast lowers an f32 input),
        `s.output(i)` an output, `s.new(shape, dtype)` a tensor the op makes for itself ("compute": the
        dtype the op runs in; "f32", "bool", "i64"; default: the output's). `s[arg]`, `s.in_shapes`,
        `s.out_shapes` and `s.params` give the arguments and concrete shapes. Default: the tensor inputs."""
        return [s.input(name) for name in s.in_shapes]

    def lower(self, c):
        raise NotImplementedError


REGISTRY: dict[str, Op] = {}


def register(cls: type[Op]) -> type[Op]:
    if cls.name in REGISTRY:
        raise ValueError(f"op {cls.name} registered twice")
    REGISTRY[cls.name] = cls()
    return cls


def get_op(name: str) -> Op | None:
    _load_ops()
    return REGISTRY.get(name)


def all_ops() -> dict[str, Op]:
    _load_ops()
    return REGISTRY


def _load_ops() -> None:
    from . import ops  # noqa: F401  (registers every op on import)
