"""`lmspec fmt`: the canonical layout, comments kept, idempotent, meaning unchanged; and its CLI."""
import collections
import dataclasses
import random
import subprocess
import sys
from pathlib import Path

import pytest
from lark import Tree

from lmspec.dsl.diagnostics import SpecError
from lmspec.dsl.formatter import _concrete, format_source
from lmspec.dsl.parser import parse

ROOT = Path(__file__).resolve().parents[2]
SPECS = sorted((ROOT / "specs").glob("**/*.arch"))
BROKEN = sorted((ROOT / "tests" / "broken_specs").glob("*.arch"))

MESSY = """

# top of file comment


use   "blocks/attention.arch"   # trailing on a use
use "other.arch"
# before the model, no blank line above it
model   demo{   # after the brace

  vocab=128_256;context = 131072 ;  dim=2048   # a ; group
  eps = 1e-5; theta=500000.0;half=dim//2
  big = 2**10 ; small = -eps ;neg=- (vocab-1)
  flag = not ( vocab>1000 and dim<4096 ) or context!=0
  width = 64 if flag else 32



  input tokens :i64[ batch,seq<=context ]
  # own line before a statement
  x = embedding( tokens , vocab,dim )as embed+position(seq,context,dim) as pos
  y = attention(rmsnorm(x, eps) as attn_norm, heads, kv_heads=kv_heads,   # why
      # an own-line comment inside the call
   causal = true,
            rope_scaling="llama3",)
  z = (x @ w) * (1.0 / sqrt(dim)) + [1,2 ,3]
  p , q = split( y , [half,half] , dim = -1 )
  repeat layers as block {

    # first in the repeat
    repeat (layers // 2) as inner { x = x+1 }   # after the inner repeat


    x = x + mlp(x, 4*dim, act=gelu)

    # last in the repeat

  }
  output y : f32[batch, seq, vocab]   # the output
}
block swiglu( x:[*,d],hidden=4*d ,  ) ->[ * , d ]{ return linear(silu(linear(x, hidden)) * linear(x, hidden), d) }
# end of file


# really the end
"""

EXPECTED = """\
# top of file comment

use "blocks/attention.arch"  # trailing on a use
use "other.arch"

# before the model, no blank line above it
model demo {  # after the brace
  vocab = 128_256; context = 131072; dim = 2048  # a ; group
  eps = 1e-5; theta = 500000.0; half = dim // 2
  big = 2 ** 10; small = -eps; neg = -(vocab - 1)
  flag = not (vocab > 1000 and dim < 4096) or context != 0
  width = 64 if flag else 32

  input tokens: i64[batch, seq <= context]
  # own line before a statement
  x = embedding(tokens, vocab, dim) as embed + position(seq, context, dim) as pos
  y = attention(rmsnorm(x, eps) as attn_norm, heads, kv_heads=kv_heads,  # why
                # an own-line comment inside the call
                causal=true,
                rope_scaling="llama3")
  z = (x @ w) * (1.0 / sqrt(dim)) + [1, 2, 3]
  p, q = split(y, [half, half], dim=-1)
  repeat layers as block {
    # first in the repeat
    repeat (layers // 2) as inner {
      x = x + 1
    }  # after the inner repeat

    x = x + mlp(x, 4 * dim, act=gelu)

    # last in the repeat
  }
  output y: f32[batch, seq, vocab]  # the output
}

block swiglu(x: [*, d], hidden = 4 * d) -> [*, d] {
  return linear(silu(linear(x, hidden)) * linear(x, hidden), d)
}
# end of file

# really the end
"""


def strip_spans(node):
    """A syntax tree as nested tuples, without spans (and the file name and text of a Module)."""
    if dataclasses.is_dataclass(node):
        return (type(node).__name__,) + tuple(
            strip_spans(getattr(node, f.name)) for f in dataclasses.fields(node)
            if f.name not in ("span", "func_span", "name_span", "index_span", "file", "source"))
    if isinstance(node, list):
        return [strip_spans(n) for n in node]
    return node


def comments(text: str) -> collections.Counter:
    return collections.Counter(c.value.rstrip() for c in _concrete(text)[1])


def assert_good(text: str) -> str:
    """Format `text` and check the promises: same meaning, same comments, idempotent, tidy lines."""
    out = format_source(text)
    assert strip_spans(parse(out)) == strip_spans(parse(text))
    assert comments(out) == comments(text)
    assert format_source(out) == out
    assert all(line == line.rstrip() for line in out.splitlines())
    assert out == "" or (out.endswith("\n") and not out.endswith("\n\n"))
    assert "\n\n\n" not in out and "{\n\n" not in out and "\n\n}" not in "\n" + out.replace(" ", "")
    return out


# ---- the layout ----------------------------------------------------------------------------

def test_messy_input_gets_the_canonical_layout():
    assert assert_good(MESSY) == EXPECTED


def test_canonical_text_is_left_alone():
    assert format_source(EXPECTED) == EXPECTED


@pytest.mark.parametrize("source, expected", [
    ("", ""),
    ("\n\n  \n", ""),
    ("# only a comment   \n\n\n\n# and another", "# only a comment\n\n# and another\n"),
    ("model a {}\r\nmodel b { # c\r\n}\r\n", "model a {}\n\nmodel b {  # c\n}\n"),
    ('use "a"; use "b"; model m {} # t\nblock f() {}', 'use "a"\nuse "b"\n\nmodel m {}  # t\n\nblock f() {}\n'),
    # a repeat never shares a line; the user's `;` groups and line breaks after commas stay
    ("model m { x = 1; repeat 2 as b { y = 2 }; z = f(a,\n b); w = 3 }",
     "model m {\n  x = 1\n  repeat 2 as b {\n    y = 2\n  }\n  z = f(a,\n        b); w = 3\n}\n"),
    # a repeat's index, and indexing
    ("model m { repeat 2 as b ,i { y = w [ i ]+f(v)[i-1] } }",
     "model m {\n  repeat 2 as b, i {\n    y = w[i] + f(v)[i - 1]\n  }\n}\n"),
    # breaks that are not after a comma go; continuation lines align inside their own bracket
    ("model m {\n\tx = f(\n    a, b,\n  c\n  )\n}", "model m {\n  x = f(a, b,\n        c)\n}\n"),
    ("model m {\n x = f(g(a,\n b), [1,\n 2],\n c)\n}",
     "model m {\n  x = f(g(a,\n          b), [1,\n               2],\n        c)\n}\n"),
    # a comment before a comma: the comma stays with its item
    ("model m {\n x = f(a # c\n , b)\n}", "model m {\n  x = f(a,  # c\n        b)\n}\n"),
    # the user's parentheses, numbers and strings are kept as written
    ('model m { x = ((a)) * (b ** -c) + 1_000 + 1E5 + .5 + "s  t" }',
     'model m {\n  x = ((a)) * (b ** -c) + 1_000 + 1E5 + .5 + "s  t"\n}\n'),
    ("model m { x = a-b-c ; y = a-(b-c); z = - - a; w = [ ]; v = f( ) }",
     "model m {\n  x = a - b - c; y = a - (b - c); z = --a; w = []; v = f()\n}\n"),
    ("model m { a = x if c else y if d else z; b = not not c; e = x==1 or y>=2 and z<3 }",
     "model m {\n  a = x if c else y if d else z; b = not not c; e = x == 1 or y >= 2 and z < 3\n}\n"),
    ("block f(x:bf16[*,n<=8,2*d],\n  y) ->f32[n] { return x }",
     "block f(x: bf16[*, n <= 8, 2 * d],\n        y) -> f32[n] {\n  return x\n}\n"),
])
def test_layout_rules(source, expected):
    assert assert_good(source) == expected


def test_a_syntax_error_is_a_located_spec_error():
    with pytest.raises(SpecError) as info:
        format_source("model m {\n  x = \n}\n", "bad.arch")
    assert "bad.arch:2:" in info.value.render() and "^" in info.value.render()


# ---- every shipped spec, and perturbed copies of them ---------------------------------------

@pytest.mark.parametrize("path", SPECS + BROKEN, ids=lambda p: str(p.relative_to(ROOT)))
def test_real_specs_keep_their_meaning_and_comments(path):
    text = path.read_text()
    try:
        parse(text)
    except SpecError:
        pytest.skip("does not parse (a syntax-error example)")
    assert_good(text)


def _tokens(tree):
    for c in tree.children:
        if isinstance(c, Tree):
            yield from _tokens(c)
        else:
            yield c


def _perturb(text: str, rng: random.Random) -> str:
    """The same program with random spacing, blank lines, line breaks inside brackets and
    comments at every place a comment can go."""
    toks = list(_tokens(_concrete(text)[0]))
    out, depth, n = [], 0, 0
    word = lambda ch: ch.isalnum() or ch in '_."'  # noqa: E731
    for tok, nxt in zip(toks, toks[1:] + [None]):
        if tok.type == "_NL":
            if rng.random() < .3:
                n += 1
                out.append(f" # t{n}")
            out.append("\n" * rng.choice([1, 1, 2, 3]))
            if rng.random() < .3:
                n += 1
                out.append(" " * rng.randint(0, 5) + f"# o{n}\n")
            continue
        out.append(tok.value)
        depth += (tok.type in ("LPAR", "LSQB")) - (tok.type in ("RPAR", "RSQB"))
        if nxt is None or tok.type == "DTYPE":
            continue
        if depth and rng.random() < .25:
            if rng.random() < .5:
                n += 1
                out.append(f"  # b{n}")
            out.append("\n" + " " * rng.randint(0, 9))
            if rng.random() < .3:
                n += 1
                out.append(f"# ob{n}\n" + " " * rng.randint(0, 4))
            continue
        need = nxt.type != "_NL" and word(tok.value[-1]) and word(nxt.value[0])
        out.append(" " * rng.randint(1 if need else 0, 3))
    return "# top\n\n" + "".join(out) + "\n# end\n"


@pytest.mark.parametrize("path", SPECS, ids=lambda p: p.name)
def test_perturbed_specs_keep_their_meaning_and_comments(path):
    assert_good(_perturb(path.read_text(), random.Random(path.name)))


def test_perturbed_messy_input_keeps_its_meaning_and_comments():
    rng = random.Random(0)
    for _ in range(4):
        assert_good(_perturb(MESSY, rng))


# ---- the command line ------------------------------------------------------------------------

def fmt(*args, cwd, stdin=None):
    return subprocess.run([sys.executable, "-m", "lmspec.runtime", "fmt", *map(str, args)], cwd=cwd,
                          input=stdin, capture_output=True, text=True)


@pytest.fixture
def files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "messy.arch").write_text(MESSY)
    (tmp_path / "sub" / "clean.arch").write_text(EXPECTED)
    return tmp_path


def test_cli_rewrites_changed_files_in_place(files):
    clean_mtime = (files / "sub" / "clean.arch").stat().st_mtime_ns
    out = fmt(files, cwd=files)
    assert out.returncode == 0, out.stderr
    assert out.stdout.splitlines() == [f"reformatted {files / 'messy.arch'}",
                                       "1 file reformatted, 1 file left unchanged"]
    assert (files / "messy.arch").read_text() == EXPECTED
    assert (files / "sub" / "clean.arch").stat().st_mtime_ns == clean_mtime  # untouched
    assert sorted(p.name for p in files.rglob("*")) == ["clean.arch", "messy.arch", "sub"]  # no temporaries
    again = fmt("messy.arch", "sub/*.arch", cwd=files)
    assert again.returncode == 0 and again.stdout.strip() == "2 files left unchanged"


def test_cli_check_writes_nothing_and_fails_on_unformatted_files(files):
    out = fmt("--check", ".", cwd=files)
    assert out.returncode == 1
    assert "would reformat ./messy.arch" in out.stdout.splitlines()
    assert (files / "messy.arch").read_text() == MESSY
    assert fmt("--check", "sub/clean.arch", cwd=files).returncode == 0


def test_every_shipped_spec_is_formatted():
    out = fmt("--check", "specs/", cwd=ROOT)
    assert out.returncode == 0, out.stdout + out.stderr
    assert out.stdout.strip() == f"{len(SPECS)} files would be left unchanged"


def test_cli_diff_prints_a_unified_diff_and_writes_nothing(files):
    out = fmt("--diff", "messy.arch", "sub/clean.arch", cwd=files)
    assert out.returncode == 1
    assert out.stdout.startswith("--- messy.arch\n+++ messy.arch\n@@ ")
    assert "-model   demo{   # after the brace\n" in out.stdout and "+model demo {  # after the brace\n" in out.stdout
    assert (files / "messy.arch").read_text() == MESSY
    assert fmt("--diff", "sub/clean.arch", cwd=files).stdout == ""


def test_cli_stdin_to_stdout(files):
    out = fmt("-", cwd=files, stdin=MESSY)
    assert out.returncode == 0 and out.stdout == EXPECTED


def test_cli_syntax_error_is_located_and_leaves_the_file_alone(files):
    bad = "model m {\n  x = f(1,\n}\n"
    (files / "bad.arch").write_text(bad)
    out = fmt("bad.arch", "messy.arch", cwd=files)
    assert out.returncode == 1
    assert "bad.arch:3:1: error: unexpected '}'" in out.stderr and "^" in out.stderr
    assert "Traceback" not in out.stderr
    assert (files / "bad.arch").read_text() == bad
    assert (files / "messy.arch").read_text() == EXPECTED  # the good file is still formatted


def test_cli_missing_file_is_one_line_and_a_non_zero_exit(files):
    out = fmt("messy.arch", "nope.arch", cwd=files)
    assert out.returncode != 0
    assert out.stderr.strip().splitlines() == ["lmspec fmt: error: nope.arch: no such file"]
    assert (files / "messy.arch").read_text() == MESSY  # nothing is written when an argument is wrong


def test_cli_does_not_import_torch(files):
    code = ("import sys; from lmspec.runtime.cli import main; rc = main(['fmt', '--check', 'sub']); "
            "assert 'torch' not in sys.modules; sys.exit(rc)")
    out = subprocess.run([sys.executable, "-c", code], cwd=files, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
