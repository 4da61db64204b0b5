"""Parse .arch text into the syntax tree of dsl/ast.py, or raise SpecError with located diagnostics."""
from __future__ import annotations

import functools
from pathlib import Path

from lark import Lark, Token, Transformer, Tree, v_args
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken, VisitError

from . import ast
from .diagnostics import Diagnostic, SpecError

_GRAMMAR = Path(__file__).with_name("grammar.lark")

_OPENERS = {"LPAR", "LSQB"}
_CLOSERS = {"RPAR", "RSQB"}


MAX_DEPTH = 200  # far beyond what a person writes; the passes after parsing recurse once per level
MAX_BRACKETS = 100  # brackets inside brackets: each is a level of the formatter's concrete tree too


class _TooDeep(Exception):
    def __init__(self, where):
        super().__init__()
        self.where = where  # a token, or a tree node's meta: both have line and column


class _DropNewlinesInBrackets:
    """A line break inside ( ) or [ ] continues the statement, as in Python."""

    always_accept = ("_NL",)

    def process(self, stream):
        depth = 0
        for tok in stream:
            if tok.type in _OPENERS:
                depth += 1
                if depth > MAX_BRACKETS:
                    raise _TooDeep(tok)
            elif tok.type in _CLOSERS:
                depth = max(0, depth - 1)
            elif tok.type == "_NL" and depth:
                continue
            yield tok


@functools.cache
def _lark() -> Lark:
    return Lark(
        _GRAMMAR.read_text(),
        parser="lalr",
        propagate_positions=True,
        postlex=_DropNewlinesInBrackets(),
        maybe_placeholders=True,
        cache=True,
    )


def _int(text: str) -> int:
    return int(text.replace("_", ""))


@v_args(meta=True, inline=True)
class _ToAst(Transformer):
    def __init__(self, file: str):
        super().__init__()
        self.file = file

    def span(self, meta) -> ast.Span:
        return ast.Span(self.file, meta.line, meta.column, meta.end_line, meta.end_column)

    def tspan(self, tok: Token) -> ast.Span:
        return ast.Span(self.file, tok.line, tok.column, tok.end_line, tok.end_column)

    # top level
    def start(self, meta, *items):
        module = ast.Module(file=self.file, source="")
        for item in items:
            if isinstance(item, ast.Use):
                module.uses.append(item)
            elif isinstance(item, ast.Model):
                module.models.append(item)
            elif isinstance(item, ast.Block):
                module.blocks.append(item)
        return module

    def use_stmt(self, meta, path):
        return ast.Use(path[1:-1], self.span(meta))

    def model_def(self, meta, name, body):
        return ast.Model(str(name), body, self.span(meta))

    def block_def(self, meta, name, *rest):
        *params, returns, body = rest
        params = [p for p in params if p is not None]
        return ast.Block(str(name), params, returns, body, self.span(meta))

    def block_param(self, meta, name, type_, default):
        return ast.BlockParam(str(name), type_, default, self.span(meta))

    def body(self, meta, *stmts):
        return [s for s in stmts if s is not None]

    # statements
    def assign(self, meta, *parts):
        *targets, value = parts
        return ast.Assign(list(targets), value, self.span(meta))

    def target(self, meta, name):
        return ast.Name(str(name), self.tspan(name))

    def input_decl(self, meta, name, type_):
        return ast.Input(str(name), type_, self.span(meta))

    def output_decl(self, meta, name, type_):
        return ast.Output(str(name), type_, self.span(meta))

    def repeat(self, meta, count, name, body):
        return ast.Repeat(count, str(name), body, self.span(meta))

    def return_stmt(self, meta, value):
        return ast.Return(value, self.span(meta))

    # types
    def tensor_type(self, meta, dtype, *dims):
        dtype = str(dtype) if dtype is not None else None
        return ast.TensorType(dtype, [d for d in dims if d is not None], self.span(meta))

    def star_dim(self, meta):
        return ast.StarDim(self.span(meta))

    def bounded_dim(self, meta, dim, _le, bound):
        return ast.BoundedDim(dim, bound, self.span(meta))

    # expressions
    def _bin(op):
        def build(self, meta, left, right):
            return ast.BinOp(op, left, right, self.span(meta))
        return build

    add = _bin("+")
    sub = _bin("-")
    mul = _bin("*")
    div = _bin("/")
    floordiv = _bin("//")
    mod = _bin("%")
    matmul = _bin("@")
    pow = _bin("**")

    def compare(self, meta, left, op, right):
        return ast.BinOp(str(op), left, right, self.span(meta))

    or_op = _bin("or")
    and_op = _bin("and")

    def not_op(self, meta, operand):
        return ast.Not(operand, self.span(meta))

    def ternary(self, meta, then, condition, otherwise):
        return ast.IfElse(condition, then, otherwise, self.span(meta))

    def neg(self, meta, operand):
        return ast.Neg(operand, self.span(meta))

    def named(self, meta, value, name):
        return ast.Named(value, str(name), self.tspan(name), self.span(meta))

    def var(self, meta, name):
        return ast.Name(str(name), self.tspan(name))

    def int_lit(self, meta, tok):
        return ast.Number(_int(tok), self.tspan(tok))

    def float_lit(self, meta, tok):
        return ast.Number(float(tok.replace("_", "")), self.tspan(tok))

    def true_lit(self, meta):
        return ast.Bool(True, self.span(meta))

    def false_lit(self, meta):
        return ast.Bool(False, self.span(meta))

    def none_lit(self, meta):
        return ast.NoneLit(self.span(meta))

    def string_lit(self, meta, tok):
        return ast.String(tok[1:-1], self.tspan(tok))

    def call(self, meta, name, *args):
        positional, keywords = [], []
        for a in args:
            if a is None:
                continue
            (keywords if isinstance(a, ast.Keyword) else positional).append(a)
        return ast.Call(str(name), self.tspan(name), positional, keywords, self.span(meta))

    def kwarg(self, meta, name, value):
        return ast.Keyword(str(name), value, self.span(meta))

    def list_lit(self, meta, *items):
        return ast.ListLit([i for i in items if i is not None], self.span(meta))


_NICE = {
    "NAME": "a name", "INT": "an integer", "FLOAT": "a float", "STRING": "a string",
    "DTYPE": "a dtype", "_NL": "a line break", "$END": "end of file",
}


def _describe(terminal: str) -> str:
    if terminal in _NICE:
        return _NICE[terminal]
    try:
        pattern = _lark().get_terminal(terminal).pattern
        if pattern.type == "str":
            return f"'{pattern.value}'"
    except KeyError:
        pass
    return terminal


def _syntax_error(err: UnexpectedInput, file: str, text: str) -> Diagnostic:
    line, col = max(1, err.line if err.line != -1 else 1), max(1, err.column if err.column != -1 else 1)
    width = 1
    if isinstance(err, UnexpectedToken):
        tok = err.token
        if tok.type == "$END":
            lines = text.splitlines() or [""]
            line, col = len(lines), len(lines[-1]) + 1
            found = "end of file"
        elif tok.type == "_NL":
            found = "end of line"
        else:
            found = f"'{tok}'"
            width = max(1, len(str(tok)))
        choices = getattr(err, "accepts", None) or err.expected
        expected = sorted({_describe(t) for t in choices if not t.startswith("__")})
        msg = f"unexpected {found}"
        if expected:
            msg += "; expected " + (", ".join(expected[:-1]) + " or " + expected[-1] if len(expected) > 1 else expected[0])
    elif isinstance(err, UnexpectedCharacters):
        msg = f"unexpected character {text[err.pos_in_stream]!r}" if err.pos_in_stream < len(text) else "unexpected character"
    elif isinstance(err, UnexpectedEOF):
        msg = "unexpected end of file"
    else:
        msg = str(err)
    span = ast.Span(file, line, col, line, col + width)
    return Diagnostic(msg, span, code="E001")


def _too_deep(tree):
    """The meta of a node nested deeper than MAX_DEPTH, or None; iterative, since recursion is
    exactly what such a tree would break."""
    stack = [(tree, 0)]
    while stack:
        node, depth = stack.pop()
        if depth > MAX_DEPTH:
            return node.meta
        stack.extend((child, depth + 1) for child in node.children if isinstance(child, Tree))
    return None


def _nesting_error(file: str, text: str, where, limit: str) -> SpecError:
    span = ast.Span(file, where.line, where.column, where.line, where.column + 1)
    return SpecError([Diagnostic(f"{limit} nested too deeply", span, code="E001")], {file: text})


def parse(text: str, file: str = "<string>") -> ast.Module:
    """Parse one file; raise SpecError (with a located 'syntax error' diagnostic) on bad input."""
    try:
        tree = _lark().parse(text)
    except UnexpectedInput as err:
        raise SpecError([_syntax_error(err, file, text)], {file: text}) from None
    except _TooDeep as err:
        raise _nesting_error(file, text, err.where, f"brackets (more than {MAX_BRACKETS} levels)") from None
    too_deep = _too_deep(tree)
    if too_deep is not None:
        raise _nesting_error(file, text, too_deep, f"expression (more than {MAX_DEPTH} levels)")
    try:
        module = _ToAst(file).transform(tree)
    except VisitError as err:  # a literal our transformer could not convert
        raise SpecError([Diagnostic(f"syntax error: {err.orig_exc}", None, code="E001", file=file)], {file: text}) from None
    module.source = text
    return module
