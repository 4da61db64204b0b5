import pytest

from lmspec.dsl import ast
from lmspec.dsl.diagnostics import SpecError
from lmspec.dsl.parser import parse

SRC = """# a comment
use "blocks/x.arch"
model m {
  a = 2; b = a * 3 + 1   # two statements on one line
  input tokens: i64[batch, seq <= 16]
  y = f(tokens, a,
        key=true) as named
  p, q = split(y, 2)
  repeat b as layer {
    y = y + 1
  }
  output y: f32[batch, seq, 4]
}

block g(x: [*, d], hidden = 4 * d) -> [*, d] {
  return x @ x
}
"""


def test_parses_every_construct_with_spans():
    m = parse(SRC, "t.arch")
    assert [u.path for u in m.uses] == ["blocks/x.arch"]
    model = m.models[0]
    kinds = [type(s).__name__ for s in model.body]
    assert kinds == ["Assign", "Assign", "Input", "Assign", "Assign", "Repeat", "Output"]
    b = model.body[1]
    assert isinstance(b.value, ast.BinOp) and b.value.op == "+"
    assert (b.span.line, b.span.column) == (4, 10)
    inp = model.body[2]
    assert isinstance(inp.type.dims[1], ast.BoundedDim) and inp.type.dtype == "i64"
    call = model.body[3].value
    assert isinstance(call, ast.Named) and call.name == "named"
    assert call.value.func == "f" and [k.name for k in call.value.kwargs] == ["key"]
    assert call.span.end_line == 7  # the call spans two lines
    assert [t.id for t in model.body[4].targets] == ["p", "q"]
    block = m.blocks[0]
    assert [p.name for p in block.params] == ["x", "hidden"]
    assert isinstance(block.params[0].type.dims[0], ast.StarDim)
    assert isinstance(block.body[0], ast.Return)


def test_precedence():
    m = parse("model m { x = 1 + 2 * 3 ** 2 - -4 }")
    e = m.models[0].body[0].value
    assert e.op == "-" and e.left.op == "+" and e.left.right.op == "*" and e.left.right.right.op == "**"
    assert isinstance(e.right, ast.Neg)


def test_as_binds_tighter_than_plus():
    e = parse("model m { x = f(a) as u + g(b) as v }").models[0].body[0].value
    assert e.op == "+" and isinstance(e.left, ast.Named) and isinstance(e.right, ast.Named)


@pytest.mark.parametrize("src, where, words", [
    ("model m {\n  x = (1 +\n}\n", (3, 1), "unexpected '}'"),
    ("model m { x = 1 $ 2 }", (1, 17), "unexpected character '$'"),
    ("model m { x = 1", (1, 16), "unexpected end of file"),
    ("model { }", (1, 7), "expected a name"),
])
def test_syntax_errors_are_located(src, where, words):
    with pytest.raises(SpecError) as info:
        parse(src, "bad.arch")
    d = info.value.diagnostics[0]
    assert (d.span.line, d.span.column) == where
    assert words in d.message
    assert "bad.arch:%d:%d: error:" % where in info.value.render()


def test_comparisons_logic_and_conditionals():
    m = parse("model m { a = 1 if b < 2 and not c or d == e else 3 }")
    e = m.models[0].body[0].value
    assert isinstance(e, ast.IfElse)
    cond = e.condition
    assert cond.op == "or" and cond.left.op == "and" and isinstance(cond.left.right, ast.Not)
    assert cond.left.left.op == "<" and cond.right.op == "=="


def test_dim_bound_is_not_a_comparison():
    m = parse("model m { input t: i64[b, s <= 8] }")
    assert isinstance(m.models[0].body[0].type.dims[1], ast.BoundedDim)


def test_less_or_equal_is_a_comparison_in_expressions_and_a_bound_in_dims():
    m = parse("model m {\n  c = a <= b\n  input t: i64[n <= 8]\n}\n", "t.arch")
    c, inp = m.models[0].body
    assert isinstance(c.value, ast.BinOp) and c.value.op == "<="
    assert isinstance(inp.type.dims[0], ast.BoundedDim)
