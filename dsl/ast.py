"""The syntax tree of an .arch file. Every node carries the span it was parsed from."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Union


@dataclass(frozen=True)
class Span:
    file: str
    line: int
    column: int
    end_line: int
    end_column: int

    def __str__(self) -> str:
        return f"{self.file}:{self.line}:{self.column}"


# ---- expressions -------------------------------------------------------------------------

@dataclass
class Name:
    id: str
    span: Span


@dataclass
class Number:
    value: int | float
    span: Span


@dataclass
class Bool:
    value: bool
    span: Span


@dataclass
class NoneLit:
    span: Span


@dataclass
class String:
    value: str
    span: Span


@dataclass
class BinOp:
    op: str  # one of + - * / // % @ **, a comparison (== != < <= > >=), and, or
    left: "Expr"
    right: "Expr"
    span: Span


@dataclass
class Neg:
    operand: "Expr"
    span: Span


@dataclass
class Not:
    operand: "Expr"
    span: Span


@dataclass
class IfElse:
    """`then if condition else otherwise`, on hyper-parameters."""
    condition: "Expr"
    then: "Expr"
    otherwise: "Expr"
    span: Span


@dataclass
class Keyword:
    name: str
    value: "Expr"
    span: Span


@dataclass
class Call:
    func: str
    func_span: Span
    args: list["Expr"]
    kwargs: list[Keyword]
    span: Span


@dataclass
class ListLit:
    items: list["Expr"]
    span: Span


@dataclass
class Index:
    """`value[index]`: an item of a list (a hyper-parameter per layer, read with a repeat's index)."""
    value: "Expr"
    index: "Expr"
    span: Span


@dataclass
class Named:
    """`expr as name`: names the node (and, for ops with weights, their parameter scope)."""
    value: "Expr"
    name: str
    name_span: Span
    span: Span


Expr = Union[Name, Number, Bool, NoneLit, String, BinOp, Neg, Not, IfElse, Call, ListLit, Index, Named]


# ---- types ---------------------------------------------------------------------------------

@dataclass
class StarDim:
    span: Span


@dataclass
class BoundedDim:
    """`seq <= context` in an input declaration."""
    dim: Expr
    bound: Expr
    span: Span


Dim = Union[StarDim, BoundedDim, Expr]


@dataclass
class TensorType:
    dtype: str | None
    dims: list[Dim]
    span: Span


# ---- statements ----------------------------------------------------------------------------

@dataclass
class Assign:
    targets: list[Name]
    value: Expr
    span: Span


@dataclass
class Input:
    name: str
    type: TensorType
    span: Span


@dataclass
class Output:
    name: str
    type: TensorType | None
    span: Span


@dataclass
class Repeat:
    count: Expr
    name: str
    body: list["Stmt"]
    span: Span
    index: str | None = None  # `repeat N as block, i`: the name the layer's index is bound to
    index_span: Span | None = None


@dataclass
class Return:
    value: Expr
    span: Span


Stmt = Union[Assign, Input, Output, Repeat, Return]


# ---- top level -----------------------------------------------------------------------------

@dataclass
class Use:
    path: str
    span: Span


@dataclass
class BlockParam:
    name: str
    type: TensorType | None
    default: Expr | None
    span: Span


@dataclass
class Block:
    name: str
    params: list[BlockParam]
    returns: TensorType | None
    body: list[Stmt]
    span: Span


@dataclass
class Model:
    name: str
    body: list[Stmt]
    span: Span


@dataclass
class Module:
    """One parsed file."""
    file: str
    source: str
    uses: list[Use] = field(default_factory=list)
    models: list[Model] = field(default_factory=list)
    blocks: list[Block] = field(default_factory=list)
