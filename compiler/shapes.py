"""Symbolic tensor shapes.

A dimension is an int or a `Sym`: an integer coefficient times a product of named symbols
(`batch`, `seq`, `2*seq`, `batch*seq`). That is enough to check reshapes and splits of
symbolic axes exactly, without a computer-algebra system.
"""
from __future__ import annotations

from collections import Counter
from typing import Union


class Sym:
    __slots__ = ("coef", "factors")

    def __init__(self, factors: tuple[str, ...] | str, coef: int = 1):
        if isinstance(factors, str):
            factors = (factors,)
        self.factors = tuple(sorted(factors))
        self.coef = coef

    def __eq__(self, other) -> bool:
        return isinstance(other, Sym) and self.coef == other.coef and self.factors == other.factors

    def __hash__(self) -> int:
        return hash((self.coef, self.factors))

    def __repr__(self) -> str:
        return fmt_dim(self)


Dim = Union[int, Sym]
Shape = tuple  # of Dim


def is_dim(v) -> bool:
    return isinstance(v, Sym) or (isinstance(v, int) and not isinstance(v, bool))


def _norm(coef: int, factors: tuple[str, ...]) -> Dim:
    if coef == 0 or not factors:
        return coef
    return Sym(factors, coef)


def _parts(d: Dim) -> tuple[int, tuple[str, ...]]:
    return (d.coef, d.factors) if isinstance(d, Sym) else (d, ())


def dim_mul(a: Dim, b: Dim) -> Dim:
    ca, fa = _parts(a)
    cb, fb = _parts(b)
    return _norm(ca * cb, fa + fb)


def dim_div(a: Dim, b: Dim) -> Dim | None:
    """a / b when it is exact (as a monomial), else None."""
    ca, fa = _parts(a)
    cb, fb = _parts(b)
    if cb == 0 or ca % cb:
        return None
    rest = Counter(fa)
    rest.subtract(Counter(fb))
    if any(n < 0 for n in rest.values()):
        return None
    return _norm(ca // cb, tuple(rest.elements()))


def dim_add(a: Dim, b: Dim, sign: int = 1) -> Dim | None:
    ca, fa = _parts(a)
    cb, fb = _parts(b)
    if fa == fb or ca == 0 or cb == 0:
        return _norm(ca + sign * cb, fa or fb)
    return None


def prod(shape) -> Dim:
    out: Dim = 1
    for d in shape:
        out = dim_mul(out, d)
    return out


def fmt_dim(d: Dim) -> str:
    if isinstance(d, Sym):
        names = "*".join(d.factors)
        return names if d.coef == 1 else f"{d.coef}*{names}"
    return str(d)


def fmt_shape(shape) -> str:
    return "[" + ", ".join(fmt_dim(d) for d in shape) + "]"


def broadcast(a: Shape, b: Shape) -> Shape | None:
    """numpy broadcasting of two shapes, or None when they do not broadcast."""
    out = []
    for i in range(1, max(len(a), len(b)) + 1):
        da = a[-i] if i <= len(a) else 1
        db = b[-i] if i <= len(b) else 1
        if da == db or db == 1:
            out.append(da)
        elif da == 1:
            out.append(db)
        else:
            return None
    return tuple(reversed(out))


def concrete(d: Dim, values: dict[str, int]) -> int:
    """The int a dimension takes when each symbol has a value."""
    if isinstance(d, Sym):
        n = d.coef
        for f in d.factors:
            n *= values[f]
        return n
    return d


def concrete_shape(shape, values: dict[str, int]) -> tuple[int, ...]:
    return tuple(concrete(d, values) for d in shape)
