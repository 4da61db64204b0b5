"""Fuzzing `lmspec check` and `lmspec fmt`: specs from specs/ and tests/broken_specs/, cut, spliced,
with tokens swapped, lines moved and characters inserted. For every input, checking must return
diagnostics (never raise), finish in bounded time, and locate every diagnostic inside the file it
names; every input that parses must format to text that formats to itself (format_source also
re-parses its output and compares the syntax trees).

The default run is derandomised (the same inputs every time, so CI is reproducible);
`pytest -m slow tests/dsl/test_fuzz_check.py` runs a longer, random campaign.
"""
from __future__ import annotations

import os
import re
import signal
from contextlib import contextmanager
from pathlib import Path

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from lmspec.compiler import check_file
from lmspec.dsl.diagnostics import Diagnostic, SpecError
from lmspec.dsl.formatter import format_source
from lmspec.dsl.parser import parse

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
    if d.span is None:
        return
    text = sources.get(d.span.file)
    assert text is not None, f"{d} names a file that was not read"
    lines = text.split("\n")
    s = d.span
    assert 1 <= s.line <= len(lines), f"line {s.line} outside {len(lines)} lines: {d}"
    assert 1 <= s.column <= len(lines[s.line - 1]) + 1, f"column outside line {s.line}: {d}"
    assert (s.end_line, s.end_column) >= (s.line, s.column), d
    assert s.end_line <= len(lines), d


def check_one(path: Path, text: str) -> list[Diagnostic]:
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
    try:
        parse(text, name)
    except SpecError:
        return diagnostics
    with time_limit(SECONDS_PER_INPUT):
        once = format_source(text, name)
        assert format_source(once, name) == once
    return diagnostics


FAST = settings(max_examples=1000, deadline=None, derandomize=True, database=None,
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
