"""A mistake that only shows when a block is called with certain arguments names the calls that led
there, innermost first, across `use`d files, in the human form and in every machine format."""
from __future__ import annotations

import json

import pytest

from lmspec.compiler import check_file
from lmspec.runtime.cli.main import main

LIB = """block proj(x, width) {
  return linear(x, width) + x
}

block layer(x, width, scale = width / 0) {
  return proj(x, width)
}
"""
MODEL = """use "lib.arch"

model m {
  input tokens: i64[batch, seq <= 8]
  x = embedding(tokens, 10, 16)
  y = layer(x, 16)
  z = layer(y, 32)
  output z
}
"""


@pytest.fixture()
def spec(tmp_path, monkeypatch):
    (tmp_path / "lib.arch").write_text(LIB)
    (tmp_path / "model.arch").write_text(MODEL)
    monkeypatch.chdir(tmp_path)
    return "model.arch"


def check(capsys, *argv) -> tuple[int, str, str]:
    rc = main(["check", *argv])
    out = capsys.readouterr()
    return rc, out.out, out.err


def test_the_error_and_each_call_are_located_innermost_first(spec, capsys):
    rc, _, err = check(capsys, spec)
    assert rc == 1
    # the default `width / 0` fails at each call (the first call's error is reported once, with its note)
    assert err.splitlines()[:6] == [
        "lib.arch:5:31: error: division by zero [E201 wrong-kind]",
        "    5 | block layer(x, width, scale = width / 0) {",
        "      |                               ^~~~~~~~~",
        "model.arch:6:7: note: in block 'layer', called from here",
        "    6 |   y = layer(x, 16)",
        "      |       ^~~~~~~~~~~~",
    ]


def test_a_shape_error_two_calls_deep_names_both_calls_across_files(tmp_path, capsys, monkeypatch):
    (tmp_path / "lib.arch").write_text(LIB.replace("scale = width / 0", "scale = 1"))
    (tmp_path / "model.arch").write_text(MODEL)
    monkeypatch.chdir(tmp_path)
    rc, _, err = check(capsys, "model.arch")
    assert rc == 1
    assert err.splitlines() == [
        "lib.arch:2:10: error: add: shapes [batch, seq, 32] and [batch, seq, 16] differ [E103 type-mismatch]",
        "    2 |   return linear(x, width) + x",
        "      |          ^~~~~~~~~~~~~~~~~~~~",
        "lib.arch:6:10: note: in block 'proj', called from here",
        "    6 |   return proj(x, width)",
        "      |          ^~~~~~~~~~~~~~",
        "model.arch:7:7: note: in block 'layer', called from here",
        "    7 |   z = layer(y, 32)",
        "      |       ^~~~~~~~~~~~",
    ]
    rc, out, _ = check(capsys, "model.arch", "--format", "json")
    (d,) = json.loads(out)
    assert [(n["file"], n["line"], n["column"], n["message"]) for n in d["notes"]] == [
        ("lib.arch", 6, 10, "in block 'proj', called from here"),
        ("model.arch", 7, 7, "in block 'layer', called from here")]
    rc, out, _ = check(capsys, "model.arch", "--format", "github")
    assert out.strip().endswith("::add: shapes [batch, seq, 32] and [batch, seq, 16] differ"
                                "%0Alib.arch:6:10: note: in block 'proj', called from here"
                                "%0Amodel.arch:7:7: note: in block 'layer', called from here")
    rc, out, _ = check(capsys, "model.arch", "--format", "sarif")
    (result,) = json.loads(out)["runs"][0]["results"]
    related = [(r["message"]["text"], r["physicalLocation"]["artifactLocation"]["uri"],
                r["physicalLocation"]["region"]["startLine"]) for r in result["relatedLocations"]]
    assert related == [("in block 'proj', called from here", "lib.arch", 6),
                       ("in block 'layer', called from here", "model.arch", 7)]


def test_a_mistake_at_the_call_itself_has_no_note_of_that_call(tmp_path):
    src = ("block b(x: [t, d]) {\n  return x\n}\nmodel m {\n  input t: i64[batch, seq <= 8]\n"
           "  y = b(embedding(t, 10, 16))\n  output y\n}\n")
    diagnostics, _ = check_file("m.arch", sources={"m.arch": src})
    (d,) = diagnostics
    assert (d.span.line, d.span.column) == (6, 9) and d.notes == []


def test_diagnostics_outside_blocks_have_no_notes_and_json_keeps_its_ten_fields(tmp_path, capsys, monkeypatch):
    (tmp_path / "m.arch").write_text("model m {\n  x = foo(1)\n}\n")
    monkeypatch.chdir(tmp_path)
    _, out, _ = check(capsys, "m.arch", "--format", "json")
    (d,) = json.loads(out)
    assert "notes" not in d and len(d) == 9
