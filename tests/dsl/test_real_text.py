"""Text people really have: a byte-order mark, a forgotten `)`, a mistyped option value, blocks
that call each other. Each is reported where it is, in words that say what to do."""
from __future__ import annotations

import pytest

from lmspec.dsl.formatter import format_source
from lmspec.runtime.cli.main import main

BOM = "\ufeff"
GOOD = "model m {\n  input t: i64[batch, seq <= 8]\n  x = embedding(t, 10, 16)\n  output x\n}\n"


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def write(tmp_path, text: str, name: str = "m.arch") -> str:
    path = tmp_path / name
    path.write_bytes(text.encode("utf-8"))
    return str(path)


def test_a_byte_order_mark_is_accepted_and_columns_count_after_it(tmp_path, capsys):
    rc, out, err = run(capsys, "check", write(tmp_path, BOM + GOOD))
    assert rc == 0 and out.strip() == "checked 1 file: ok" and not err
    path = write(tmp_path, BOM + "model m { x = foo(1) }\n")
    rc, _, err = run(capsys, "check", path)
    assert rc == 1
    assert err.splitlines()[:3] == [f"{path}:1:15: error: unknown op or block 'foo' [E101 unknown-op]",
                                    "    1 | model m { x = foo(1) }",
                                    "      |               ^~~"]


def test_fmt_keeps_the_byte_order_mark(tmp_path, capsys):
    path = write(tmp_path, BOM + GOOD.replace("embedding(t, 10, 16)", "embedding(t,10,16)"))
    rc, out, _ = run(capsys, "fmt", path)
    assert rc == 0 and "reformatted" in out
    with open(path, "rb") as f:
        assert f.read() == (BOM + GOOD).encode("utf-8")
    rc, out, _ = run(capsys, "fmt", "--check", path)
    assert rc == 0
    assert format_source(GOOD) == GOOD  # and none is added where there was none


@pytest.mark.parametrize("body, where, message", [
    # the `)` is missing at the end of line 3, not at line 4's `y`
    ("  x = embedding(t, 10,\n                16\n  y = linear(x, 4)\n  output y\n", "4:19",
     "missing ')' to close the call of 'embedding' (its '(' is at line 3, column 16)"),
    ("  x = embedding(t, 10, 16\n  output x\n", "3:26",
     "missing ')' to close the call of 'embedding' (its '(' is at line 3, column 16)"),
    ("  x = reshape(embedding(t, 10, 16), [batch, seq, 4, 4\n  output x\n", "3:54",
     "missing ']' to close the '[' at line 3, column 37"),
    ("  x = 2 * (3 + 4\n", "3:17", "missing ')' to close the '(' at line 3, column 11"),
])
def test_a_missing_closer_is_reported_where_it_is_missing(tmp_path, capsys, body, where, message):
    path = write(tmp_path, "model m {\n  input t: i64[batch, seq <= 8]\n" + body + "}\n")
    rc, _, err = run(capsys, "check", path)
    assert rc == 1
    assert err.splitlines()[0] == f"{path}:{where}: error: {message} [E001 syntax-error]"


def test_a_call_continued_after_a_comma_is_not_a_missing_closer(tmp_path, capsys):
    path = write(tmp_path, "model m {\n  x = f(1,\n        2 3)\n}\n")
    rc, _, err = run(capsys, "check", path)
    assert rc == 1 and err.startswith(f"{path}:3:11: error: unexpected '3'; expected")


@pytest.mark.parametrize("option, where, message", [
    ("act=gelux", "4:18", "mlp: act must be one of 'gelu', 'gelu_tanh', 'silu', 'relu', got 'gelux'; "
                          "did you mean 'gelu'?"),
    ('act="sillu"', "4:18", "mlp: act must be one of 'gelu', 'gelu_tanh', 'silu', 'relu', got 'sillu'; "
                            "did you mean 'silu'?"),
])
def test_a_mistyped_option_value_gets_a_did_you_mean(tmp_path, capsys, option, where, message):
    path = write(tmp_path, GOOD.replace("  output x", f"  y = mlp(x, 64, {option})\n  output y"))
    rc, _, err = run(capsys, "check", path)
    assert rc == 1 and err.splitlines()[0] == f"{path}:{where}: error: {message} [E104 bad-argument]"


def test_a_mistyped_string_option_gets_a_did_you_mean(tmp_path, capsys):
    path = write(tmp_path, GOOD.replace("  output x", '  y = attention(x, 4, rope=true, rope_scaling="lama3")\n'
                                                     "  output y"))
    rc, _, err = run(capsys, "check", path)
    assert rc == 1
    assert err.splitlines()[0] == (f"{path}:4:34: error: attention: rope_scaling must be one of 'linear', "
                                   f"'llama3', got 'lama3'; did you mean 'llama3'? [E104 bad-argument]")


@pytest.mark.parametrize("blocks, message", [
    ({"a": "a"}, "block 'a' calls itself (recursion is not allowed)"),
    ({"a": "b", "b": "a"}, "blocks 'a' and 'b' call each other: a -> b -> a (recursion is not allowed)"),
    ({"a": "b", "b": "c", "c": "a"},
     "blocks 'a', 'b' and 'c' call each other: a -> b -> c -> a (recursion is not allowed)"),
])
def test_recursion_between_blocks_is_named(tmp_path, capsys, blocks, message):
    text = "".join(f"block {name}(x) {{\n  return {callee}(x)\n}}\n" for name, callee in blocks.items())
    path = write(tmp_path, text + GOOD.replace("  output x", "  y = a(x)\n  output y"))
    rc, _, err = run(capsys, "check", path)
    last = 3 * len(blocks) - 1  # the call that closes the circle, in the last block
    assert rc == 1 and err.splitlines()[0] == f"{path}:{last}:10: error: {message} [E108 recursive-block]"
