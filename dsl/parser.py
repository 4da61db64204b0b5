"""Parse .arch text into the syntax tree of dsl/ast.py, or raise SpecError with located diagnostics."""
from __future__ import annotations

import contextlib
import functools
import gc
import math
import threading
from dataclasses import dataclass, field
from pathlib import Path

from lark import Lark, Token, Tree
from lark.exceptions import UnexpectedCharacters, UnexpectedEOF, UnexpectedInput, UnexpectedToken

from . import ast
from .diagnostics import Diagnostic, SpecError

_GRAMMAR = Path(__file__).with_name("grammar.lark")

_CLOSING_OF = {"LPAR": "RPAR", "LSQB": "RSQB"}  # each opening bracket and its closer
_CLOSERS = set(_CLOSING_OF.values())
BOM = "\ufeff"  # a UTF-8 byte-order mark, as some editors on Windows write it

MAX_DEPTH = 200  # far beyond what a person writes; the passes after parsing recurse once per level
MAX_BRACKETS = 100  # brackets inside brackets: each is a level of the formatter's concrete tree too
INT64_MAX = 2 ** 63 - 1  # the largest int torch (and ONNX) can hold in a shape or a scalar


class _TooDeep(Exception):
    def __init__(self, where):
        super().__init__()
        self.where = where  # a token, or a tree node's meta: both have line and column


class _BadLiteral(Exception):
    """A number literal that no int64 or float64 can hold; `token` locates it."""

    def __init__(self, message: str, token: Token):
        super().__init__(message)
        self.token = token


@dataclass
class _Brackets:
    """Where the post-lexer is in the token stream, so that a syntax error can say which bracket
    was left open: the brackets open (each with the token before it: a call's name), the last
    token passed to the parser, whether a line break after it was dropped, and all that as it
    was before that token."""
    opened: list[tuple[Token, Token | None]] = field(default_factory=list)
    last: Token | None = None
    newline: bool = False
    previous: tuple = (None, False, None)

    def before(self, token: Token) -> tuple[Token | None, bool, tuple[Token, Token | None] | None]:
        """(last token, line break dropped after it, innermost open bracket) just before `token`:
        the parser rejects a token it was given, the contextual lexer one it never passed on."""
        if token is self.last:
            return self.previous
        return self.last, self.newline, self.opened[-1] if self.opened else None


class _DropNewlinesInBrackets:
    """A line break inside ( ) or [ ] continues the statement, as in Python."""

    always_accept = ("_NL",)

    def __init__(self):
        self._local = threading.local()  # one parse per thread at a time: its state is its own

    @property
    def state(self) -> _Brackets | None:
        return getattr(self._local, "state", None)

    def process(self, stream):
        state = self._local.state = _Brackets()
        opened = state.opened
        for tok in stream:
            if tok.type == "_NL" and opened:
                state.newline = True
                continue
            state.previous = (state.last, state.newline, opened[-1] if opened else None)
            if tok.type in _CLOSING_OF:
                opened.append((tok, state.last))
                if len(opened) > MAX_BRACKETS:
                    raise _TooDeep(tok)
            elif tok.type in _CLOSERS and opened:
                opened.pop()
            state.last, state.newline = tok, False
            yield tok


_POSTLEX = _DropNewlinesInBrackets()


@contextlib.contextmanager
def gc_paused():
    """No cyclic garbage collection inside: parsing and building allocate millions of objects
    and free none of them in cycles, and on a 5 MB spec the collector's passes over them doubled
    the time (as mypy and black pause it for the same reason)."""
    enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if enabled:
            gc.enable()


@functools.cache
def _lark() -> Lark:
    return Lark(
        _GRAMMAR.read_text(),
        parser="lalr",
        propagate_positions=True,
        postlex=_POSTLEX,
        maybe_placeholders=True,
        cache=True,
    )


def _int(tok: Token) -> int:
    digits = tok.replace("_", "").lstrip("0") or "0"
    if len(digits) > len(str(INT64_MAX)) or int(digits) > INT64_MAX:  # int() of 5,000 digits would raise
        shown = tok if len(tok) <= 30 else f"{tok[:12]}…{tok[-12:]} ({len(digits)} digits)"
        raise _BadLiteral(f"integer {shown} is too large: the largest is 2^63 - 1 = {INT64_MAX:,}", tok)
    return int(digits)


def _float(tok: Token) -> float:
    value = float(tok.replace("_", ""))
    if math.isinf(value):
        raise _BadLiteral(f"float {tok} is too large for a float64 (the largest is about 1.8e308)", tok)
    return value


class _ToAst:
    """One method per grammar rule, called with the node's meta and its converted children."""

    def __init__(self, file: str):
        self.file = file

    def transform(self, tree: Tree):
        """Convert bottom-up without recursion, calling each rule's method directly: lark's
        Transformer wraps every call, which costs more than the rest of the conversion."""
        stack: list[tuple[Tree, bool]] = [(tree, False)]
        done: list = []
        while stack:
            node, ready = stack.pop()
            if not isinstance(node, Tree):
                done.append(node)  # a token, or None for an optional part left out
            elif ready:
                n = len(node.children)
                children = done[len(done) - n:] if n else []
                del done[len(done) - n:]
                done.append(getattr(self, node.data)(node.meta, *children))
            else:
                stack.append((node, True))
                stack.extend((child, False) for child in reversed(node.children))
        return done[0]

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

    def repeat(self, meta, count, name, index, body):
        return ast.Repeat(count, str(name), body, self.span(meta), None if index is None else str(index),
                          None if index is None else self.tspan(index))

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
        return ast.Number(_float(tok), self.tspan(tok))

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

    def index(self, meta, value, index):
        return ast.Index(value, index, self.span(meta))

    def list_lit(self, meta, *items):
        return ast.ListLit([i for i in items if i is not None], self.span(meta))


_NICE = {
    "NAME": "a name", "INT": "an integer", "FLOAT": "a float", "STRING": "a string",
    "DTYPE": "a dtype", "_NL": "a line break", "$END": "end of file", "COMPARE": "a comparison",
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


def _unclosed(err: UnexpectedInput, file: str) -> Diagnostic | None:
    """The diagnostic for a bracket left open, when the error looks like one: the parser, still
    inside ( or [ that accepts its closer here, met the next line's first token (the line break
    was dropped as a continuation) or the end of the file. Located just after the last token
    inside the bracket, where the closer is missing, not at the next line's first token."""
    state = _POSTLEX.state
    if not isinstance(err, UnexpectedToken) or state is None:
        return None
    last, newline, inner = state.before(err.token)
    if inner is None or last is None:
        return None
    opener, before = inner
    closer = _CLOSING_OF[opener.type]
    if not (err.token.type == "$END" or newline) or closer not in err.expected or last.type in ("COMMA", *_CLOSING_OF):
        return None  # a line that continues after a comma or an open bracket is no missing closer
    shut = _describe(closer)
    where = f"line {opener.line}, column {opener.column}"
    if before is not None and before.type == "NAME" and opener.type == "LPAR":
        message = f"missing {shut} to close the call of '{before}' (its '(' is at {where})"
    else:
        message = f"missing {shut} to close the {_describe(opener.type)} at {where}"
    return Diagnostic(message, ast.Span(file, last.end_line, last.end_column, last.end_line, last.end_column + 1),
                      code="E001")


def _syntax_error(err: UnexpectedInput, file: str, text: str) -> Diagnostic:
    unclosed = _unclosed(err, file)
    if unclosed is not None:
        return unclosed
    line, col = max(1, err.line if err.line != -1 else 1), max(1, err.column if err.column != -1 else 1)
    width = 1
    if isinstance(err, UnexpectedToken):
        tok = err.token
        if tok.type == "$END":
            lines = text.removesuffix("\n").split("\n")  # as lark counts lines: a form feed ends none
            line, col = len(lines), len(lines[-1].removesuffix("\r")) + 1
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
    """Parse one file; raise SpecError (with a located 'syntax error' diagnostic) on bad input.
    A leading byte-order mark is not part of the text: columns on line 1 count from after it."""
    text = text.removeprefix(BOM)
    with gc_paused():
        return _parse(text, file)


def _parse(text: str, file: str) -> ast.Module:
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
    except _BadLiteral as err:
        tok = err.token
        span = ast.Span(file, tok.line, tok.column, tok.end_line, tok.end_column)
        raise SpecError([Diagnostic(str(err), span, code="E204")], {file: text}) from None
    module.source = text
    return module
