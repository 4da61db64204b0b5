"""The canonical layout of .arch text (`lmspec fmt`): same meaning, same comments, one style.

The printer walks lark's *concrete* tree (every token kept, parentheses included), not the AST, so
numbers and strings keep the text they were written with, the user's parentheses stay (printing
never changes what an expression means), and every token keeps its position, by which comments
(which the grammar ignores; a lexer callback collects them) are put back:

- a comment on the same line as code stays at the end of that line (two spaces before the `#`);
- a comment on a line of its own goes before the code that follows it, at that code's indentation
  (statement level, or aligned inside the brackets it sits in), or at the end of a body before `}`,
  or at the top or end of the file.

Layout: 2 spaces per body level; one space around binary operators, `=` of assignments, `<=` of
dims, `->`, `as`, `if`/`else`; none around `=` of keyword arguments; `, ` between items (a trailing
comma is dropped). Statements the user put on one line with `;` stay there, joined by `; `. Inside
brackets a line break after a comma is kept and the next line aligned one column after the
bracket; other breaks inside brackets are dropped; no new breaks are made. Blank lines: runs
collapse to one, none right after `{` or before `}`, exactly one between top-level items (a run of
`use` lines may stay without), none at the start of the file, one newline at the end.
"""
from __future__ import annotations

import dataclasses
import functools
import threading

from lark import Lark, Token, Tree

from .parser import _GRAMMAR, BOM, _DropNewlinesInBrackets, parse

INDENT = 2

_BINARY = {"add", "sub", "mul", "div", "floordiv", "mod", "matmul", "pow", "compare", "or_op", "and_op"}
_LITERALS = {"var", "int_lit", "float_lit", "string_lit", "true_lit", "false_lit", "none_lit"}

# Comments reach us through a lexer callback; one parse at a time fills this list.
_lock = threading.Lock()
_comments: list[Token] = []


@functools.cache
def _lark() -> Lark:
    return Lark(
        _GRAMMAR.read_text(),
        parser="lalr",
        propagate_positions=True,
        keep_all_tokens=True,  # parentheses, commas and keywords stay in the tree, with positions
        maybe_placeholders=False,
        postlex=_DropNewlinesInBrackets(),
        lexer_callbacks={"COMMENT": _comments.append},
        cache=True,
    )


def _concrete(text: str) -> tuple[Tree, list[Token]]:
    with _lock:
        _comments.clear()
        tree = _lark().parse(text)
        comments = list(_comments)
    return tree, comments


def format_source(text: str, file: str = "<string>") -> str:
    """`text` in canonical form. Raises SpecError (a located diagnostic) when it does not parse.
    A byte-order mark at the start stays there: the file's encoding is its author's choice."""
    if text.startswith(BOM):
        return BOM + format_source(text[len(BOM):], file)
    before = parse(text, file)  # the same syntax errors, worded the same way, as `lmspec check`
    tree, comments = _concrete(text)
    out = _Printer(text, comments).file(tree)
    after = parse(out, file)
    if ast_key(after) != ast_key(before):  # never write a file whose meaning changed
        raise RuntimeError(f"the formatter changed the meaning of {file}")
    return out


def ast_key(node):
    """A parsed file or node as nested tuples without spans or file names: equal iff same meaning."""
    if dataclasses.is_dataclass(node):
        return (type(node).__name__,) + tuple(
            ast_key(getattr(node, f.name)) for f in dataclasses.fields(node)
            if not f.name.endswith("span") and f.name not in ("file", "source"))
    if isinstance(node, list):
        return tuple(ast_key(n) for n in node)
    return node


def _start(node) -> tuple[int, int]:
    if isinstance(node, Token):
        return node.line, node.column
    return node.meta.line, node.meta.column


class _Printer:
    def __init__(self, text: str, comments: list[Token]):
        self.blank_lines = {n for n, line in enumerate(text.splitlines(), 1) if not line.strip()}
        self.comments = comments
        self.next_comment = 0
        self.out: list[str] = []
        self.cur: str | None = None  # the output line being written; None between lines
        self.indent = 0  # column of the statements of the current body
        self.brackets: list[int] = []  # column just after each open ( or [: continuation lines align there
        self.last: Token | None = None  # the last code token printed
        self.last_line = 0  # the source line of the last code token or comment printed
        self.space = False  # a space before the next token
        self.fresh = True  # right after `{` or at the start of the file: no blank line here

    # ---- lines, blank lines and comments ---------------------------------------------------

    def _end_line(self) -> None:
        if self.cur is not None:
            self.out.append(self.cur.rstrip())
            self.cur = None

    def _blank(self) -> None:
        if self.out and self.out[-1] != "":
            self.out.append("")

    def _separate(self, line: int, force: bool = False) -> None:
        """A blank line before what starts on source `line` if the source had one there (or `force`)."""
        if force or (not self.fresh and not self.brackets
                     and any(n in self.blank_lines for n in range(self.last_line + 1, line))):
            self._blank()

    def _peek(self, before: tuple[int, int]) -> Token | None:
        if self.next_comment < len(self.comments):
            c = self.comments[self.next_comment]
            if (c.line, c.column) < before:
                return c
        return None

    def _comment(self, c: Token, force_blank: bool = False) -> bool:
        """Print one comment; whether it went on a line of its own."""
        self.next_comment += 1
        text = c.value.rstrip()
        if self.cur is not None and self.last is not None and c.line == self.last.end_line:
            self.cur = self.cur.rstrip() + "  " + text  # trailing: stays at the end of its line
            self._end_line()
            own_line = False
        else:
            self._end_line()
            self._separate(c.line, force_blank)
            column = self.brackets[-1] if self.brackets else self.indent
            self.out.append(" " * column + text)
            self.fresh = False
            own_line = True
        self.last_line = c.line
        return own_line

    def _comments_before(self, before: tuple[int, int], force_blank: bool = False) -> bool:
        """Print the comments that come before `before` (`force_blank`: a blank line before the first
        one on a line of its own); whether any went on a line of its own."""
        own_line = False
        while (c := self._peek(before)) is not None:
            own_line |= self._comment(c, force_blank and not own_line)
        return own_line

    # ---- tokens ----------------------------------------------------------------------------

    def _tok(self, tok: Token, space: bool = False) -> None:
        """Print one token: its comments first, then a line break if one is kept here, then it."""
        self._comments_before((tok.line, tok.column))
        if (self.cur is not None and self.brackets and self.last is not None
                and self.last.type == "COMMA" and tok.line > self.last.end_line):
            self._end_line()  # the user's line break after a comma inside brackets
        if self.cur is None:
            self.cur = " " * (self.brackets[-1] if self.brackets else self.indent)
        elif space or self.space:
            self.cur += " "
        self.cur += tok.value
        self.space = False
        self.last, self.last_line = tok, tok.end_line
        if tok.type in ("LPAR", "LSQB"):
            self.brackets.append(len(self.cur))
        elif tok.type in ("RPAR", "RSQB"):
            self.brackets.pop()

    def _spaced(self, tok: Token) -> None:
        """A token with a space on both sides: `=`, `+`, `as`, `if`, `->`…"""
        self._tok(tok, space=True)
        self.space = True

    def _bracketed(self, children: list, item) -> None:
        """`( a, b )` or `[ a, b ]` (children from the opening to the closing bracket): `, ` between
        items, no trailing comma, `item` prints each item."""
        open_, *inner, close = children
        self._tok(open_)
        while inner and isinstance(inner[-1], Token) and inner[-1].type == "COMMA":
            inner.pop()  # a trailing comma
        for child in inner:
            if isinstance(child, Token) and child.type == "COMMA":
                if self._peek((child.line, child.column)) is None:
                    self._tok(child)
                else:  # `a  # note` then `, b`: the comma stays with `a`, the comment follows it
                    self.cur += ","
                self.space = True
            else:
                item(child)
        self._tok(close)

    # ---- expressions -----------------------------------------------------------------------

    def expr(self, node) -> None:
        """An expression exactly as parsed: the tree keeps the user's parentheses, so no
        precedence needs deciding here, only spacing."""
        if isinstance(node, Token):  # a bare name (a repeat count, a dim)
            self._tok(node)
            return
        kind, ch = node.data, node.children
        if kind in _LITERALS:
            self._tok(ch[0])
        elif kind in _BINARY or kind in ("named", "bounded_dim"):  # a OP b, a as name, d <= bound
            self.expr(ch[0])
            self._spaced(ch[1])
            self.expr(ch[2])
        elif kind == "neg":  # -x
            self._tok(ch[0])
            self.expr(ch[1])
        elif kind == "not_op":  # not x
            self._spaced(ch[0])
            self.expr(ch[1])
        elif kind == "ternary":  # a if c else b
            self.expr(ch[0])
            self._spaced(ch[1])
            self.expr(ch[2])
            self._spaced(ch[3])
            self.expr(ch[4])
        elif kind == "call":
            self._tok(ch[0])
            self._bracketed(ch[1:], self._arg)
        elif kind == "list_lit":
            self._bracketed(ch, self.expr)
        elif kind == "index":  # value[i]
            self.expr(ch[0])
            self._tok(ch[1])
            self.expr(ch[2])
            self._tok(ch[3])
        elif kind in ("atom", "repeat_count"):  # ( expr )
            self._tok(ch[0])
            self.expr(ch[1])
            self._tok(ch[2])
        elif kind == "star_dim":
            self._tok(ch[0])
        elif kind == "tensor_type":  # f32[a, b]
            if ch[0].type == "DTYPE":
                self._tok(ch[0])
                ch = ch[1:]
            self._bracketed(ch, self.expr)
        else:
            raise ValueError(f"formatter: unknown expression {kind}")

    def _arg(self, node) -> None:
        if isinstance(node, Tree) and node.data == "kwarg":  # name=value, no spaces
            self._tok(node.children[0])
            self._tok(node.children[1])
            self.expr(node.children[2])
        else:
            self.expr(node)

    # ---- statements and items --------------------------------------------------------------

    def stmt(self, node: Tree) -> None:
        kind, ch = node.data, node.children
        if kind == "assign":  # a, b = expr
            for child in ch[:-1]:
                if isinstance(child, Tree):
                    self._tok(child.children[0])
                elif child.type == "COMMA":
                    self._tok(child)
                    self.space = True
                else:
                    self._spaced(child)
            self.expr(ch[-1])
        elif kind in ("input_decl", "output_decl"):  # input name: type
            self._spaced(ch[0])
            self._tok(ch[1])
            if len(ch) > 2:
                self._tok(ch[2])
                self.space = True
                self.expr(ch[3])
        elif kind == "return_stmt":
            self._spaced(ch[0])
            self.expr(ch[1])
        elif kind == "repeat":  # repeat count as name[, index] { body }
            self._spaced(ch[0])
            self.expr(ch[1])
            self._spaced(ch[2])
            self._tok(ch[3])
            rest = ch[4:]
            if isinstance(rest[0], Token) and rest[0].type == "COMMA":
                self._tok(rest[0])
                self.space = True
                self._tok(rest[1])
                rest = rest[2:]
            self.body(rest)
        else:
            raise ValueError(f"formatter: unknown statement {kind}")

    def body(self, children: list) -> None:
        """`{ body }`: statements one line each (or as the user grouped them with `;`)."""
        open_, body, close = children
        self._tok(open_, space=True)
        stmts = [c for c in body.children if isinstance(c, Tree)]
        if not stmts and self._peek((close.line, close.column)) is None:
            self._tok(close)  # {}
            return
        self.indent += INDENT
        self.fresh = True
        prev = None
        for s in stmts:
            if (prev is not None and s.data != "repeat" and prev.data != "repeat"
                    and s.meta.line == prev.meta.end_line):
                self.cur += ";"  # the user's `;` group stays on one line
                self.space = True
            else:
                self._comments_before(_start(s))
                self._end_line()
                self._separate(s.meta.line)
            self.stmt(s)
            self.fresh = False
            prev = s
        self._comments_before((close.line, close.column))
        self._end_line()
        self.indent -= INDENT
        self._tok(close)

    def item(self, node: Tree) -> None:
        kind, ch = node.data, node.children
        if kind == "use_stmt":
            self._spaced(ch[0])
            self._tok(ch[1])
        elif kind == "model_def":  # model name { body }
            self._spaced(ch[0])
            self._tok(ch[1])
            self.body(ch[2:])
        elif kind == "block_def":  # block name(params) -> type { body }
            self._spaced(ch[0])
            self._tok(ch[1])
            close = next(i for i, c in enumerate(ch) if isinstance(c, Token) and c.type == "RPAR")
            self._bracketed(ch[2:close + 1], self._param)
            if ch[close + 1].type != "LBRACE":  # -> type
                self._spaced(ch[close + 1])
                self.expr(ch[close + 2])
            self.body(ch[-3:])
        else:
            raise ValueError(f"formatter: unknown item {kind}")

    def _param(self, node: Tree) -> None:  # name: type = default
        for child in node.children:
            if isinstance(child, Tree):
                self.expr(child)
            elif child.type == "COLON":
                self._tok(child)
                self.space = True
            elif child.type == "EQUAL":
                self._spaced(child)
            else:
                self._tok(child)

    def file(self, tree: Tree) -> str:
        prev = None
        for node in (c for c in tree.children if isinstance(c, Tree)):
            # exactly one blank line between items, except within a run of `use` lines
            force = prev is not None and not (prev.data == node.data == "use_stmt")
            if self._comments_before(_start(node), force_blank=force):
                force = False  # the blank line went before the comments, which belong to this item
            self._end_line()
            self._separate(node.meta.line, force)
            self.item(node)
            self.fresh = False
            prev = node
        self._comments_before((float("inf"), 0))
        self._end_line()
        if len(self.comments) != self.next_comment:  # cannot happen: every comment is before the end
            raise RuntimeError("formatter: a comment was not printed")
        return "\n".join(self.out) + "\n" if self.out else ""
