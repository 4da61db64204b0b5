"""The values a spec's expressions evaluate to while the graph is built."""
from __future__ import annotations

from dataclasses import dataclass

from .shapes import fmt_shape


@dataclass(frozen=True)
class TensorRef:
    """Output `index` of graph node `node`."""
    node: str
    index: int
    shape: tuple
    dtype: str

    def __str__(self) -> str:
        return f"tensor {self.dtype}{fmt_shape(self.shape)}"


@dataclass(frozen=True)
class FuncRef:
    """An op named as a value, e.g. `act=gelu`."""
    name: str

    def __str__(self) -> str:
        return f"function {self.name}"


class _Poison:
    """The value of an expression that already produced an error: its users stay quiet."""

    def __repr__(self) -> str:
        return "<error>"


POISON = _Poison()


def describe(v) -> str:
    """How a value is named in an error message."""
    from .shapes import Sym
    if isinstance(v, bool):
        return f"bool {str(v).lower()}"
    if isinstance(v, int):
        return f"int {v}"
    if isinstance(v, float):
        return f"float {v}"
    if isinstance(v, Sym):
        return f"dim {v}"
    if isinstance(v, str):
        return f'string "{v}"'
    if v is None:
        return "none"
    if isinstance(v, (list, tuple)) and not isinstance(v, TensorRef):
        return f"list of {len(v)}"
    return str(v)
