"""`lmspec check` for CI and editors: warnings, --strict, and the json, github and sarif formats."""
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from lmspec.compiler import check_file
from lmspec.dsl.codes import CODES

ROOT = Path(__file__).resolve().parents[2]

WARNED = '''use "lib.arch"

model m {
  vocab = 16; context = 8; dim = 8; unused = 3
  input tokens: i64[batch, seq <= context]
  input mask: f32[batch, seq]
  x = embedding(tokens, vocab, dim)
  y = linear(gelu(x), 4)
  a, a = split(x, 2, dim=-1)
  dim = 4
  repeat 2 as block {
    x = x + linear(x, 8)
    h = linear(x, 3)
  }
  logits = linear(x, vocab)
  output logits: f32[batch, seq, vocab]
}

block never(x) {
  return x
}
'''
LIB = "block helper(x) {\n  return x\n}\n"

# (code, line, column) of every warning WARNED must produce, in file order
EXPECTED = [
    ("W105", 1, 1),   # nothing from lib.arch is called
    ("W101", 4, 37),  # unused = 3
    ("W104", 6, 3),   # input mask is never used
    ("W104", 8, 7),   # y = linear(…) is dropped
    ("W103", 9, 6),   # a, a = …
    ("W104", 9, 10),  # split's results: `a` is never read
    ("W103", 10, 3),  # dim = 4 after dim = 8
    ("W104", 13, 9),  # h in every layer: one warning for the line, not one per layer
    ("W102", 19, 1),  # block never
]


def _check(*args, cwd=ROOT):
    return subprocess.run([sys.executable, "-m", "lmspec.runtime", "check", *args], cwd=cwd,
                          capture_output=True, text=True)


@pytest.fixture()
def warned(tmp_path):
    (tmp_path / "lib.arch").write_text(LIB)
    (tmp_path / "warn.arch").write_text(WARNED)
    return tmp_path


def test_every_warning_kind_is_found_and_located(warned):
    diagnostics, _ = check_file(str(warned / "warn.arch"))
    assert [(d.code, d.span.line, d.span.column) for d in diagnostics] == EXPECTED
    assert all(d.severity == "warning" for d in diagnostics)
    dead = next(d for d in diagnostics if d.code == "W104" and d.span.line == 13)
    # the two layers' dead `h` share a line and a warning; their parameters add up: 2 * (8*3 + 3)
    assert "54 parameters" in dead.message


def test_warnings_pass_unless_strict(warned):
    ok = _check("warn.arch", cwd=warned)
    assert ok.returncode == 0, ok.stderr
    assert ok.stdout.strip() == "checked 1 file: 9 warnings"
    assert "warn.arch:4:37: warning: hyper-parameter 'unused' is never used [W101 unused-hyper-parameter]" in ok.stderr
    strict = _check("warn.arch", "--strict", "--format", "json", cwd=warned)
    assert strict.returncode == 1
    assert {d["severity"] for d in json.loads(strict.stdout)} == {"error"}


def test_json_has_every_field(warned):
    out = _check("warn.arch", "--format", "json", cwd=warned)
    found = json.loads(out.stdout)
    assert [(d["code"], d["line"], d["column"]) for d in found] == EXPECTED
    for d in found:
        assert set(d) == {"file", "line", "column", "end_line", "end_column", "severity", "code", "name", "message"}
        assert d["file"] == "warn.arch" and d["name"] == CODES[d["code"]].name
        assert (d["end_line"], d["end_column"]) > (d["line"], d["column"])


def test_github_annotations(warned):
    (warned / "bad.arch").write_text("model m {\n  x = foo(1, 2)\n}\n")
    out = _check("bad.arch", "warn.arch", "--format", "github", cwd=warned)
    assert out.returncode == 1
    lines = out.stdout.splitlines()
    assert len(lines) == 1 + len(EXPECTED)
    pattern = re.compile(r"^::(error|warning) file=([^,]+),line=(\d+),endLine=(\d+),col=(\d+),endColumn=(\d+),"
                         r"title=([EW]\d{3}) ([a-z-]+)::(.+)$")
    parsed = [pattern.match(line) for line in lines]
    assert all(parsed), lines
    assert parsed[0].group(1, 2, 3, 5, 7, 8) == ("error", "bad.arch", "2", "7", "E101", "unknown-op")
    assert parsed[1].group(1, 2, 7) == ("warning", "warn.arch", "W105")


def test_github_escapes_what_would_end_a_command():
    from lmspec.dsl.ast import Span
    from lmspec.dsl.diagnostic_formats import to_github
    from lmspec.dsl.diagnostics import Diagnostic
    d = Diagnostic("50% of a\nb", Span("a,b:c.arch", 1, 2, 1, 3), code="E101")
    assert to_github([d]) == "::error file=a%2Cb%3Ac.arch,line=1,endLine=1,col=2,endColumn=3," \
                             "title=E101 unknown-op::50%25 of a%0Ab"


def test_sarif_log(warned):
    (warned / "bad.arch").write_text("model m {\n  x = foo(1, 2)\n}\n")
    out = _check("bad.arch", "warn.arch", "--format", "sarif", cwd=warned)
    assert out.returncode == 1
    log = json.loads(out.stdout)
    assert log["version"] == "2.1.0" and len(log["runs"]) == 1
    run = log["runs"][0]
    rules = run["tool"]["driver"]["rules"]
    assert [r["id"] for r in rules] == list(CODES)
    results = run["results"]
    assert len(results) == 1 + len(EXPECTED)
    first = results[0]
    assert first["ruleId"] == "E101" and first["level"] == "error"
    assert rules[first["ruleIndex"]]["name"] == "unknown-op"
    region = first["locations"][0]["physicalLocation"]["region"]
    assert first["locations"][0]["physicalLocation"]["artifactLocation"]["uri"] == "bad.arch"
    assert (region["startLine"], region["startColumn"], region["endColumn"]) == (2, 7, 10)
    assert {r["level"] for r in results[1:]} == {"warning"}


def test_colour_only_when_asked_or_on_a_terminal(warned):
    plain = _check("warn.arch", cwd=warned)  # a pipe, not a terminal
    assert "\033[" not in plain.stderr
    coloured = _check("warn.arch", "--color", "always", cwd=warned)
    assert "\033[1;33mwarning\033[0m" in coloured.stderr
    never = _check("warn.arch", "--color", "never", cwd=warned)
    assert never.stderr == plain.stderr


def test_a_diagnostic_without_a_line_still_names_its_file(tmp_path):
    (tmp_path / "two.arch").write_text("model a {\n}\nmodel b {\n}\n")
    out = subprocess.run([sys.executable, "-m", "lmspec.runtime", "info", "two.arch"], cwd=tmp_path,
                         capture_output=True, text=True)
    assert out.returncode == 1
    assert out.stderr.startswith("two.arch: error: defines several models (a, b); choose one with --model [E110")


def test_shipped_specs_have_no_warnings():
    out = _check("--strict", "specs/")
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip().endswith(": ok")


def test_every_code_the_source_reports_is_in_the_table():
    used = set()
    for folder in ("dsl", "compiler", "runtime"):
        for path in (ROOT / folder).rglob("*.py"):
            used |= set(re.findall(r'"([EW]\d{3})"', path.read_text()))
    assert used <= set(CODES), used - set(CODES)
    assert len({c.name for c in CODES.values()}) == len(CODES)


def test_readme_documents_every_code():
    readme = (ROOT / "README.md").read_text()
    rows = re.findall(r"^\| `([EW]\d{3})` \| `([a-z-]+)` \|", readme, re.M)
    assert rows == [(c.code, c.name) for c in CODES.values()]
