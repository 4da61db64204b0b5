"""Numeric option types with their bounds (`type=AT_LEAST_1`) and amounts with units (`Quantity`):
checked where an option is declared, in one phrasing, with the same check for a value that comes from
a --config file."""
from __future__ import annotations

import argparse
import math


class Number:
    """An argparse type: an int or a finite float within bounds. `least`/`most` are inclusive,
    `above`/`below` exclusive; a float is never NaN or infinite."""

    def __init__(self, kind: type, least: float | None = None, most: float | None = None,
                 above: float | None = None, below: float | None = None):
        self.kind, self.least, self.most, self.above, self.below = kind, least, most, above, below
        self.__name__ = self.expected()  # argparse names a type by it

    def expected(self) -> str:
        """What a value must be, as in "must be an integer >= 1"."""
        noun = "an integer" if self.kind is int else "a finite number"
        bounds = [f">= {_shown(self.least)}" if self.least is not None else None,
                  f"> {_shown(self.above)}" if self.above is not None else None,
                  f"<= {_shown(self.most)}" if self.most is not None else None,
                  f"< {_shown(self.below)}" if self.below is not None else None]
        return " ".join([noun, " and ".join(b for b in bounds if b)]).strip()

    def problem(self, value) -> str | None:
        """Why `value` (already of `kind`) is refused, or None."""
        within = ((self.kind is int or math.isfinite(value)) and (self.least is None or value >= self.least)
                  and (self.above is None or value > self.above) and (self.most is None or value <= self.most)
                  and (self.below is None or value < self.below))
        return None if within else f"must be {self.expected()}, got {_shown(value)}"

    def __call__(self, text: str):
        try:
            value = self.kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"must be {self.expected()}, got {text!r}") from None
        if (problem := self.problem(value)) is not None:
            raise argparse.ArgumentTypeError(problem)
        return value


def _shown(value) -> str:
    if isinstance(value, int) and value >= 2**32 and value & (value - 1) == 0:
        return f"2^{value.bit_length() - 1}"  # a bound such as the seed's, read at a glance
    return f"{value:g}" if isinstance(value, float) else str(value)


AT_LEAST_0 = Number(int, least=0)  # a count, where 0 means none (or "off", as the option says)
AT_LEAST_1 = Number(int, least=1)
PORT = Number(int, least=0, most=65535)  # a TCP port; 0 asks the system for a free one
THREADS = Number(int, least=1, most=65536)  # torch and onnxruntime take a C int; no CPU has more
SEED = Number(int, least=0, below=2**63)  # torch.manual_seed's range, with room for the seed + 1 training draws
POSITIVE = Number(float, above=0)
NOT_NEGATIVE = Number(float, least=0)
PROBABILITY = Number(float, above=0, most=1)  # also a fraction of a whole that may be all of it
SHARE = Number(float, least=0, below=1)  # a part of a whole that leaves some of it
STRICT_FRACTION = Number(float, above=0, below=1)


class Quantity:
    """An argparse type: a positive amount written with its unit ("80GB", "15T", "989e12"), read by
    `parse`, which raises ValueError saying what it expected."""

    def __init__(self, parse, name: str):
        self.parse = parse
        self.__name__ = name  # argparse names a type by it

    def __call__(self, text: str) -> float:
        try:
            value = self.parse(text)
        except ValueError as err:
            raise argparse.ArgumentTypeError(str(err)) from None
        if not value > 0:
            raise argparse.ArgumentTypeError(f"must be positive, got {text}")
        return value
