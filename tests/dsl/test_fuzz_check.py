"""Fuzzing `lmspec check` and `lmspec fmt`: specs from specs/ and tests/broken_specs/, cut, spliced,
with tokens swapped, lines moved and characters inserted. For every input, checking must return
diagnostics (never raise), finish in bounded time, and locate every diagnostic (and each of its
notes) inside the file it names; every input that parses must format to text that formats to itself
(format_source also re-parses its output and compares the syntax trees).

Three generators aim at `check` as the gate: hostile numbers in a model's sizes (a spec `check`
accepts must then go through `info` and `plan` without an internal error), chains and circles of
blocks calling blocks (deep ones are an error, never a RecursionError), and specs of thousands of
statements (bounded time, bounded human output).

The default run is derandomised (the same inputs every time, so CI is reproducible);
`pytest -m slow tests/dsl/test_fuzz_check.py` runs a longer, random campaign.
"""
from __future__ import annotations

import contextlib
import io
import os
import re
import signal
import tempfile
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmspec.compiler import check_file
from lmspec.compiler.build import MAX_CALL_DEPTH
from lmspec.dsl.diagnostics import Diagnostic, SpecError, render_all
from lmspec.dsl.formatter import format_source
from lmspec.dsl.parser import parse
from lmspec.runtime.cli.main import main

ROOT = Path(__file__).resolve().parents[2]
CORPUS_FILES = sorted((ROOT / "specs").rglob("*.arch")) + sorted((ROOT / "tests" / "broken_specs").glob("*.arch"))
CORPUS = [(p, p.read_text()) for p in CORPUS_FILES]
TOKENS = sorted({t for _, text in CORPUS for t in re.findall(r"[A-Za-z_]\w*|\d[\w.]*|\"[^\"\n]*\"|\S", text)}
                | {"**", "//", "<=", "->", "(", ")", "[", "]", "{", "}", "\n", ";", "#", "\"", "*", "-1", "0",
                   "99999999", "1e400", "10 ** 10 ** 10", "repeat 10000 as r {", "use \"tiny.arch\"", "block"})
SECONDS_PER_INPUT = 20  # a hang, not a slow machine: the largest shipped spec checks in well under 1 s


@contextmanager
def time_limit(seconds: int):
    def fail(signum, frame):
        raise TimeoutError(f"check took more than {seconds} s")
    previous = signal.signal(signal.SIGALRM, fail)
    signal.alarm(seconds)
    try:
        yield
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, previous)


@st.composite
def mutated_spec(draw) -> tuple[Path, str]:
    path, text = draw(st.sampled_from(CORPUS))
    for _ in range(draw(st.integers(1, 4))):
        kind = draw(st.sampled_from(["cut", "splice", "swap", "insert", "line"]))
        n = len(text)
        i = draw(st.integers(0, n))
        j = draw(st.integers(i, min(n, i + 80)))
        if kind == "cut":
            text = text[:i] + text[j:]
        elif kind == "splice":
            _, other = draw(st.sampled_from(CORPUS))
            k = draw(st.integers(0, len(other)))
            text = text[:i] + other[k:k + draw(st.integers(0, 400))] + text[j:]
        elif kind == "swap":
            words = list(re.finditer(r"[A-Za-z_]\w*|\d[\w.]*|\S", text))
            if words:
                w = draw(st.sampled_from(words))
                text = text[:w.start()] + draw(st.sampled_from(TOKENS)) + text[w.end():]
        elif kind == "insert":
            text = text[:i] + draw(st.text(alphabet="(){}[],;:=<>*+-/@#\"\n\t _az09.é\x00", max_size=6)) + text[i:]
        else:
            lines = text.split("\n")
            a = draw(st.integers(0, len(lines) - 1))
            b = draw(st.integers(0, len(lines) - 1))
            lines.insert(b, lines[a]) if draw(st.booleans()) else lines.insert(b, lines.pop(a))
            text = "\n".join(lines)
    return path, text


def assert_inside(d: Diagnostic, sources: dict[str, str]) -> None:
    assert isinstance(d.message, str) and d.message, d
    assert d.path is not None, f"a diagnostic without a file: {d}"
    for note in d.notes:
        _assert_span_inside(note.span, d, sources)
    if d.span is not None:
        _assert_span_inside(d.span, d, sources)


def _assert_span_inside(s, d: Diagnostic, sources: dict[str, str]) -> None:
    text = sources.get(s.file)
    assert text is not None, f"{d} names a file that was not read"
    lines = text.split("\n")
    assert 1 <= s.line <= len(lines), f"line {s.line} outside {len(lines)} lines: {d}"
    assert 1 <= s.column <= len(lines[s.line - 1]) + 1, f"column outside line {s.line}: {d}"
    assert (s.end_line, s.end_column) >= (s.line, s.column), d
    assert s.end_line <= len(lines), d


def check_one(path: Path, text: str, fmt: bool = True) -> list[Diagnostic]:
    # the mutated text stands in for the file it came from, so its `use`s resolve as they did
    name = os.path.relpath(path, ROOT)
    cwd = os.getcwd()
    os.chdir(ROOT)
    try:
        with time_limit(SECONDS_PER_INPUT):
            diagnostics, sources = check_file(name, sources={os.path.normpath(name): text})
    finally:
        os.chdir(cwd)
    for d in diagnostics:
        assert_inside(d, sources)
    if not fmt:
        return diagnostics
    try:
        parse(text, name)
    except SpecError:
        return diagnostics
    with time_limit(SECONDS_PER_INPUT):
        once = format_source(text, name)
        assert format_source(once, name) == once
    return diagnostics


FAST = settings(max_examples=500, deadline=None, derandomize=True, database=None,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])


@FAST
@given(mutated_spec())
def test_check_survives_mutated_specs(case):
    check_one(*case)


@pytest.mark.slow
@settings(max_examples=20000, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(mutated_spec())
def test_check_survives_a_long_random_campaign(case):
    check_one(*case)


@pytest.mark.parametrize("text", [
    "", "\n", "model", "model m {", "}", "(((((", "model m { x = " + "(" * 5000 + "1" + ")" * 5000 + " }",
    "model m {\n x = 1" + " + 1" * 5000 + "\n}", "model m {\n x = " + "-" * 3000 + "1\n}",
    "use \"/dev/zero\"\n", "use \"specs\"\n", "\x00\x01", "model m { x = 99999999999999999999 ** 99999999 }",
    "model m { x = exp(1e308) }", "model m { x = int(1e400) }", "model m { repeat 10000 as a { repeat 10000 as b {} } }",
    "model m { x = 1" + "0" * 5000 + " }", "block b(x: [*, *]) { return x }\nmodel m { input t: i64[n]\n y = b(t)\n output y }",
])
def test_check_survives_hostile_inputs(text):
    check_one(ROOT / "specs" / "hostile.arch", text)


# ---- check as the gate: hostile numbers, chains of blocks, large specs ----------------------------

HOSTILE = ["0", "-1", "2.5", "10 ** 12", "2 ** 31", "2 ** 62", "2 ** 63", "2 ** 63 - 1", "(2 ** 31) ** 2",
           "10 ** 400", "1" + "0" * 30, "1" + "0" * 5000, "9" * 19, "1e308", "1e400", "1e-400", "-(2 ** 63)",
           "exp(700)", "exp(1000)", "int(1e300)", "10 ** 6 * 10 ** 6", "0.5 ** 2000", "2 ** -1"]
SIZES = {"vocab": "16", "context": "8", "dim": "8", "heads": "2", "hidden": "32", "p": "0.0", "eps": "1e-5"}
NUMBERS_SPEC = """model m {{
  vocab = {vocab}; context = {context}; dim = {dim}; heads = {heads}; hidden = {hidden}; p = {p}; eps = {eps}
  input tokens: i64[batch, seq <= context]
  x = embedding(tokens, vocab, dim) + position(seq, context, dim)
  x = x + dropout(attention(layernorm(x, eps=eps), heads, causal=true), p)
  x = x + mlp(rmsnorm(x), hidden, act=gelu)
  logits = linear(x, vocab, bias=false)
  output logits: f32[batch, seq, vocab]
}}
"""


@st.composite
def hostile_sizes(draw) -> str:
    sizes = {k: draw(st.sampled_from(HOSTILE)) if draw(st.booleans()) else v for k, v in SIZES.items()}
    return NUMBERS_SPEC.format(**sizes)


def cli(*argv) -> tuple[int, str]:
    err = io.StringIO()
    with contextlib.redirect_stdout(io.StringIO()), contextlib.redirect_stderr(err), time_limit(SECONDS_PER_INPUT):
        rc = main(list(argv))
    return rc, err.getvalue()


@settings(max_examples=60, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(hostile_sizes())
def test_what_check_accepts_info_and_plan_never_crash_on(text):
    with tempfile.TemporaryDirectory() as tmp:
        path = os.path.join(tmp, "m.arch")
        with open(path, "w") as f:
            f.write(text)
        checked, said = cli("check", path)
        assert checked in (0, 1) and "internal error" not in said, said
        for verb in ("info", "plan"):
            rc, err = cli(verb, path)
            assert "internal error" not in err and "Traceback" not in err, (verb, err)
            # refused by check: refused here too, with a located line; accepted: printed
            assert rc == checked, (verb, said, err)
            if rc:
                assert err.startswith(f"{path}:"), err


@st.composite
def block_chain(draw) -> tuple[str, int, int | None]:
    """Blocks b0 -> b1 -> ... -> b{n}; b{n} returns, or calls b{back} to close a circle."""
    n = draw(st.integers(0, 2 * MAX_CALL_DEPTH + 50))
    back = draw(st.one_of(st.none(), st.integers(0, n)))
    blocks = [f"block b{i}(x, k = {i}) {{\n  return b{i + 1}(x) + 0 * k\n}}\n" for i in range(n)]
    blocks.append(f"block b{n}(x) {{\n  return {'x' if back is None else f'b{back}(x)'}\n}}\n")
    order = draw(st.permutations(range(n + 1)))  # definitions in any order: calls are resolved by name
    text = "".join(blocks[i] for i in order) + ("model m {\n  input t: i64[batch, seq <= 8]\n"
                                                "  x = embedding(t, 10, 16)\n  y = b0(x)\n  output y\n}\n")
    return text, n, back


@settings(max_examples=15, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(block_chain())
def test_chains_and_circles_of_blocks_are_located_errors(case):
    text, n, back = case
    diagnostics = check_one(ROOT / "specs" / "chain.arch", text, fmt=False)
    codes = {d.code for d in diagnostics if d.severity == "error"}
    calls = n + 1 if back is None else None  # depth reached by a chain that ends
    if back is not None and n < MAX_CALL_DEPTH:
        assert codes == {"E108"}, diagnostics
        closing = "calls itself" if back == n else f"-> b{back} (recursion"
        assert any(closing in d.message for d in diagnostics), diagnostics
    elif calls is not None and calls <= MAX_CALL_DEPTH:
        assert not codes, diagnostics
    else:
        assert codes == {"E112"}, diagnostics


STATEMENTS = ["  x = linear(x, 16)\n", "  d{i} = linear(x, {w})\n", "  h{i} = {i}\n", "  u{i} = zz{i}\n",
              "  x = x + b(x)\n", "  y{i} = mlp(x, 4, act=gelux)\n", "  x = x * 1.5; q{i} = {i} ** {w}\n",
              "  repeat 2 as r{i} {{\n    x = layernorm(x)\n  }}\n"]


@st.composite
def large_spec(draw) -> str:
    kinds = draw(st.lists(st.sampled_from(STATEMENTS), min_size=1, max_size=4))
    n = draw(st.integers(1000, 3000))
    body = "".join(kinds[i % len(kinds)].format(i=i, w=draw(st.sampled_from(["4", "16", "99"]))) if i < 3
                   else kinds[i % len(kinds)].format(i=i, w=16) for i in range(n))
    return ("block b(x) {\n  return linear(x, 16)\n}\nmodel m {\n  input t: i64[batch, seq <= 8]\n"
            "  x = embedding(t, 10, 16)\n" + body + "  output x\n}\n")


@settings(max_examples=3, deadline=None, derandomize=True, database=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
@given(large_spec())
def test_large_specs_check_in_bounded_time_and_output(text):
    name = os.path.join("specs", "large.arch")
    diagnostics = check_one(ROOT / name, text, fmt=False)  # check at scale; the mutations above cover fmt
    shown = render_all(diagnostics, {name: text})
    assert len(shown) < 1_000_000
    assert len(shown.splitlines()) <= 3 * 100 + 2 * 10 * 3 * 100 + 1  # 100 diagnostics, 10 notes each at most
