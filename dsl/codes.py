"""Every diagnostic code lmspec reports, its stable name and what it means.

Codes never change meaning once released: CI configurations and editor integrations key on them.
README.md's table of codes is checked against this one (tests/compiler/test_check_formats.py).
"""
from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class Code:
    code: str
    name: str
    summary: str

    @property
    def severity(self) -> str:
        return "warning" if self.code.startswith("W") else "error"


_TABLE = [
    # reading and parsing
    Code("E001", "syntax-error", "the text does not follow the grammar"),
    Code("E002", "unreadable-file", "a spec or a `use`d file is missing, a directory, or not UTF-8"),
    # names, calls and structure
    Code("E101", "unknown-op", "a call names no built-in op, block or scalar function"),
    Code("E102", "unknown-name", "a name is read before anything defines it"),
    Code("E103", "type-mismatch", "a tensor's shape or dtype is not what an op, block or declaration needs"),
    Code("E104", "bad-argument", "too many, unknown, repeated, missing or ill-typed arguments"),
    Code("E105", "bad-tie", "`tie=` names no module, or one whose weight has another shape"),
    Code("E106", "bad-override", "`--set` names no hyper-parameter, or gives a value of another type"),
    Code("E107", "duplicate-name", "a block, module or output name is already taken"),
    Code("E108", "recursive-block", "a block calls itself, directly or through other blocks"),
    Code("E109", "import-cycle", "files `use` each other in a circle"),
    Code("E110", "no-model", "no model (or several) to build, or a model without an output"),
    Code("E111", "misplaced-statement", "`input`, `output` or `return` where it is not allowed"),
    Code("E112", "too-deep", "block calls or `use`d files nested more than 100 deep"),
    # values and shapes
    Code("E201", "wrong-kind", "a value is of the wrong kind: a tensor for a number, a number for a condition, …"),
    Code("E202", "bad-dim", "a dim that is not a positive int or a symbol, or a misplaced `*`"),
    Code("E203", "dim-out-of-bounds", "a fixed dim larger than its declared bound"),
    Code("E204", "too-large", "a number or a tensor beyond what can be represented: an int beyond int64, a "
                              "float beyond float64, a tensor of more than 2^63 - 1 elements"),
    # export
    Code("E500", "not-exportable", "an op that has no ONNX lowering"),
    # warnings: the spec builds, but something in it is probably a mistake (`--strict` makes them errors)
    Code("W101", "unused-hyper-parameter", "a hyper-parameter that nothing reads"),
    Code("W102", "unused-block", "a block in the model's file that the model never calls"),
    Code("W103", "shadowed-name", "a name bound again so that it hides its first meaning: a hyper-parameter "
                                  "or an input's dim assigned later, one name twice in an unpacking"),
    Code("W104", "dead-node", "a computation (or an input) whose result never reaches an output"),
    Code("W105", "unused-use", "a `use` whose blocks the file never calls"),
    Code("W106", "huge-model", "weights alone over 100 TB in fp32: probably a typo in a size"),
]

CODES: dict[str, Code] = {c.code: c for c in _TABLE}


def code_name(code: str) -> str:
    known = CODES.get(code)
    return known.name if known else "internal"
