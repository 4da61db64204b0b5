"""The arithmetic of a spec's hyper-parameters and symbolic dims (`dim * 4`, `heads // 2`, `seq + 1`,
`min(a, b)`), with the errors a spec can make in it: a result torch and ONNX cannot hold, a division
by zero, an operator the operands do not have."""
from __future__ import annotations

import math

from lmspec.dsl.parser import INT64_MAX

from .shapes import Sym, dim_add, dim_div, dim_mul
from .values import describe

SCALAR_FUNCS = {
    "sqrt": math.sqrt, "exp": math.exp, "log": math.log,
    "min": min, "max": max, "int": int, "float": float,
}


class ScalarError(Exception):
    """A mistake in scalar arithmetic; the builder reports it at the expression with its code."""

    def __init__(self, message: str, code: str = "E201"):
        super().__init__(message)
        self.code = code


def representable(v) -> bool:
    """Whether torch and ONNX can hold `v`: an int64, a finite float64, a dim whose coefficient is an int64."""
    if isinstance(v, bool):
        return True
    if isinstance(v, int):
        return -INT64_MAX - 1 <= v <= INT64_MAX
    if isinstance(v, float):
        return math.isfinite(v)
    if isinstance(v, Sym):
        return abs(v.coef) <= INT64_MAX
    return True


BEYOND_INT64 = "the result is beyond an int64 (more than 2^63 - 1 in size)"
BEYOND_FLOAT64 = "the result is too large for a float64"


def too_large(v) -> str:
    return BEYOND_FLOAT64 if isinstance(v, float) else BEYOND_INT64


_COMPARE = {"==": lambda a, b: a == b, "!=": lambda a, b: a != b, "<": lambda a, b: a < b,
            "<=": lambda a, b: a <= b, ">": lambda a, b: a > b, ">=": lambda a, b: a >= b}


def scalar_binop(op: str, a, b):
    """`a op b` for hyper-parameters and dims; raises ScalarError."""
    value = _scalar_value(op, a, b)
    if not representable(value):
        raise ScalarError(f"{describe(a)} {op} {describe(b)}: {too_large(value)}", "E204")
    return value


def _scalar_value(op: str, a, b):
    if op in ("and", "or"):
        if not isinstance(a, bool) or not isinstance(b, bool):
            raise ScalarError(f"'{op}' needs true or false on both sides, got {describe(a)} and {describe(b)}")
        return (a and b) if op == "and" else (a or b)
    if op in ("==", "!="):
        return _COMPARE[op](a, b)
    if op in _COMPARE:
        if isinstance(a, bool) or isinstance(b, bool) or not isinstance(a, (int, float)) \
                or not isinstance(b, (int, float)):
            raise ScalarError(f"cannot compare {describe(a)} and {describe(b)} with '{op}'")
        return _COMPARE[op](a, b)
    if isinstance(a, bool) or isinstance(b, bool) or not numeric(a) or not numeric(b):
        raise ScalarError(f"operator '{op}' is not defined for {describe(a)} and {describe(b)}")
    if isinstance(a, Sym) or isinstance(b, Sym):
        if isinstance(a, float) or isinstance(b, float):
            raise ScalarError(f"cannot combine {describe(a)} with a float")
        if op == "*":
            return dim_mul(a, b)
        if op in ("/", "//"):
            out = dim_div(a, b)
            if out is None:
                raise ScalarError(f"{describe(a)} is not divisible by {describe(b)}")
            return out
        if op in ("+", "-"):
            out = dim_add(a, b, 1 if op == "+" else -1)
            if out is None:
                raise ScalarError(f"cannot {'add' if op == '+' else 'subtract'} {describe(a)} and {describe(b)}")
            return out
        raise ScalarError(f"operator '{op}' is not defined for symbolic dims")
    try:
        if op == "+":
            return a + b
        if op == "-":
            return a - b
        if op == "*":
            return a * b
        if op == "/":
            if isinstance(a, int) and isinstance(b, int) and b != 0 and a % b == 0:
                return a // b
            return a / b
        if op == "//":
            return a // b
        if op == "%":
            return a % b
        if op == "**":
            # at least 2^63 without computing it: 9 ** 9223372036854775807 would take forever
            if isinstance(a, int) and isinstance(b, int) and abs(a) > 1 and (abs(a).bit_length() - 1) * b >= 63:
                raise ScalarError(f"{describe(a)} ** {describe(b)}: {BEYOND_INT64}", "E204")
            return a ** b
    except ZeroDivisionError:
        raise ScalarError("division by zero") from None
    except OverflowError:
        raise ScalarError(f"{describe(a)} {op} {describe(b)}: {BEYOND_FLOAT64}", "E204") from None
    raise ScalarError(f"operator '{op}' is not defined for {describe(a)} and {describe(b)}")


def numeric(v) -> bool:
    return isinstance(v, (int, float, Sym))
