"""`lmspec check` is the gate: what it refuses, `info` and `plan` refuse with the same located
line; what it accepts (absurd sizes included, with a warning), they print without an internal error.
Everything runs through the CLI's main(), so exit statuses and output are the user's."""
from __future__ import annotations

import os

import pytest

from lmspec.runtime.cli.main import main

SPEC = """model m {{
  vocab = 16; context = 8; dim = {dim}
  input tokens: i64[batch, seq <= context]
  x = embedding(tokens, vocab, dim)
  logits = linear(layernorm(x), vocab)
  output logits: f32[batch, seq, vocab]
}}
"""


def run(capsys, *argv) -> tuple[int, str, str]:
    rc = main(list(argv))
    out = capsys.readouterr()
    return rc, out.out, out.err


def assert_clean_refusal(capsys, path, located: str, message: str) -> None:
    """check, info and plan all exit 1 with the same located error, and nothing that looks like a bug."""
    for verb in ("check", "info", "plan"):
        rc, out, err = run(capsys, verb, str(path))
        assert rc == 1, (verb, out, err)
        assert f"{located}: error: {message}" in err, (verb, err)
        assert "internal error" not in err and "Traceback" not in err, (verb, err)


@pytest.mark.parametrize("dim, located, message", [
    ("10 ** 400", "2:34", "int 10 ** int 400: the result is beyond an int64"),
    ("1" + "0" * 400, "2:34", "integer 100000000000…000000000000 (401 digits) is too large"),
    ("1" + "0" * 5000, "2:34", "integer 100000000000…000000000000 (5001 digits) is too large"),
    ("2 ** 62 * 4", "2:34", "int 4611686018427387904 * int 4: the result is beyond an int64"),
    ("int(1e300)", "2:34", "int(): the result is beyond an int64"),
    ("int(1e400)", "2:38", "float 1e400 is too large for a float64"),
    ("2 ** 60", "4:7", "embedding: parameter 'weight' [16, 1152921504606846976] has more than 2^63 - 1 "
                       "elements: no tensor can hold it"),
])
def test_numbers_no_tensor_can_hold_are_located_errors(tmp_path, capsys, dim, located, message):
    path = tmp_path / "m.arch"
    path.write_text(SPEC.format(dim=dim))
    assert_clean_refusal(capsys, path, f"{path}:{located}", message)


def test_a_float_that_overflows_is_an_error_where_it_does(tmp_path, capsys):
    path = tmp_path / "m.arch"
    path.write_text(SPEC.format(dim="64; p = 1e300 * 1e300"))
    assert_clean_refusal(capsys, path, f"{path}:2:42", "float 1e+300 * float 1e+300: the result is too large "
                                                       "for a float64 [E204 too-large]")


def test_an_override_beyond_int64_is_refused(tmp_path, capsys):
    path = tmp_path / "m.arch"
    path.write_text(SPEC.format(dim="64"))
    rc, _, err = run(capsys, "check", str(path), "--set", "dim=" + "9" * 30)
    assert rc != 0 and "too large for an int64" in err and "internal error" not in err
    rc, _, err = run(capsys, "info", str(path), "--set", "dim=1e400")
    assert rc == 1 and "--set dim=inf: expected int" in err


def test_a_10_to_the_12_wide_model_is_a_warning_and_info_and_plan_print_it(tmp_path, capsys):
    path = tmp_path / "m.arch"
    path.write_text(SPEC.format(dim="10 ** 12"))
    rc, out, err = run(capsys, "check", str(path))
    assert rc == 0 and out.strip() == "checked 1 file: 1 warning"
    assert (f"{path}:4:7: warning: model 'm' has 34,000,000,000,016 parameters, 136 TB of fp32 weights alone "
            f"(more than 100 TB); the largest is 'emb.weight' [16, 1000000000000] [W106 huge-model]") in err
    rc, out, err = run(capsys, "check", "--strict", str(path))
    assert rc == 1
    rc, out, err = run(capsys, "info", str(path))
    assert rc == 0 and "parameters: 34,000,000,000,016" in out and not err
    rc, out, err = run(capsys, "plan", str(path))
    assert rc == 0 and "parameters: 34,000,000,000,016 (34 T)" in out and not err


def _chain_of_blocks(n: int, last: str) -> str:
    """Blocks b0 … b{n} each calling the next, the last returning `last`, and a model calling b0."""
    blocks = "".join(f"block b{i}(x) {{\n  return b{i + 1}(x)\n}}\n" for i in range(n))
    return (blocks + f"block b{n}(x) {{\n  return {last}\n}}\n"
            "model m {\n  input t: i64[batch, seq <= 8]\n  x = embedding(t, 10, 16)\n  y = b0(x)\n  output y\n}\n")


def test_a_chain_of_2000_blocks_is_a_located_error_not_a_recursion_error(tmp_path, capsys):
    n = 2000
    path = tmp_path / "chain.arch"
    path.write_text(_chain_of_blocks(n, "x"))
    # b99's body (line 299) calls the 101st block
    assert_clean_refusal(capsys, path, f"{path}:299:10", "block calls nested more than 100 deep: "
                                                         "b0 -> b1 -> b2 -> … -> b98 -> b99 -> b100 [E112 too-deep]")
    rc, _, err = run(capsys, "check", str(path))
    assert "note: … 90 more calls …" in err
    assert f"{path}:{3 * n + 7}:7: note: in block 'b0', called from here" in err


def test_99_blocks_deep_is_allowed_and_info_plan_print_it(tmp_path, capsys):
    path = tmp_path / "deep.arch"
    path.write_text(_chain_of_blocks(99, "linear(x, 16) + x"))
    for verb in ("check", "info", "plan"):
        rc, out, err = run(capsys, verb, str(path))
        assert rc == 0 and not err, (verb, err)
    assert "parameters: 432" in out


def test_ten_thousand_repeated_layers_cut_into_stages_and_plan_in_seconds(tmp_path, capsys):
    import time
    path = tmp_path / "deep.arch"
    path.write_text("model deep {\n  layers = 10000\n  input tokens: i64[batch, seq <= 64]\n"
                    "  x = embedding(tokens, 256, 16) as wte\n  repeat layers as block {\n"
                    "    x = x + attention(layernorm(x), 2, causal=true)\n  }\n"
                    "  logits = linear(layernorm(x), 256, bias=false, tie=wte)\n  output logits\n}\n")
    started = time.monotonic()
    rc, out, err = run(capsys, "info", str(path), "--pp", "4")
    assert rc == 0 and not err, err
    stages = [line for line in out.splitlines() if line.lstrip().startswith(("0 ", "1 ", "2 ", "3 "))]
    assert len(stages) == 4 and "block.0–2498" in stages[0] and "block.7503–9999 + head" in stages[3], out
    assert "imbalance: 0.0%" in out
    rc, out, err = run(capsys, "plan", str(path))
    assert rc == 0 and not err, err
    assert time.monotonic() - started < 60  # was quadratic in nodes x parameters, cubic in the stage cut


def test_use_chains_deeper_than_100_files_are_a_located_error(tmp_path, capsys):
    for i in range(150):
        (tmp_path / f"f{i}.arch").write_text(f'use "f{i + 1}.arch"\nblock g{i}(x) {{\n  return x\n}}\n')
    (tmp_path / "f150.arch").write_text("block last(x) {\n  return x\n}\n")
    rc, _, err = run(capsys, "check", str(tmp_path / "f0.arch"))
    assert rc == 1 and f"{tmp_path / 'f100.arch'}:1:1: error: `use`d files nested more than 100 deep [E112" in err


def test_an_output_declared_twice_is_a_located_error(tmp_path, capsys):
    path = tmp_path / "m.arch"
    path.write_text(SPEC.format(dim="8").replace("  output logits: f32[batch, seq, vocab]\n",
                                                   "  output logits\n  output logits: f32[batch, seq, vocab]\n"))
    assert_clean_refusal(capsys, path, f"{path}:7:3", "output 'logits' is declared twice (first at line 6) "
                                                      "[E107 duplicate-name]")


@pytest.mark.parametrize("text, what", [("", "nothing"), ("\n\n", "nothing"), ("\ufeff", "nothing"),
                                        ("# a comment\n\n# another\n", "only comments")])
def test_an_empty_or_comments_only_file_is_a_located_error(tmp_path, capsys, text, what):
    path = tmp_path / "empty.arch"
    path.write_text(text, encoding="utf-8")
    assert_clean_refusal(capsys, path, f"{path}:1:1", f"the file holds {what}: no model or block [E110 no-model]")


def test_a_bad_input_does_not_cascade_into_unknown_names(tmp_path, capsys):
    path = tmp_path / "m.arch"
    path.write_text("model m {\n  input t: i64[2 ** 40, 2 ** 40]\n  x = embedding(t, 2, 1)\n  output x\n}\n")
    rc, _, err = run(capsys, "check", str(path))
    assert rc == 1 and err.count("error:") == 1
    assert f"{path}:2:12: error: input 't' [1099511627776, 1099511627776] has more than 2^63 - 1 elements" in err


def test_info_of_a_model_without_a_sequence_and_plan_of_a_block_keeping_nothing(tmp_path, capsys):
    fixed = tmp_path / "fixed.arch"
    fixed.write_text("model m {\n  input t: i64[4, 4]\n  x = linear(embedding(t, 8, 4), 2)\n  output x\n}\n")
    rc, out, err = run(capsys, "info", str(fixed))
    assert rc == 0 and not err and "FLOPs per token: " in out
    adds = tmp_path / "adds.arch"
    adds.write_text("model m {\n  input t: i64[batch, seq <= 8]\n  x = embedding(t, 10, 16)\n"
                    "  repeat 3 as l {\n    x = x + 1\n  }\n  y = linear(x, 10)\n  output y\n}\n")
    rc, out, err = run(capsys, "plan", str(adds))
    assert rc == 0 and not err and "parameters: 330" in out


@pytest.mark.slow
def test_train_on_a_check_accepted_absurd_spec_fails_cleanly(tmp_path, capsys):
    pytest.importorskip("torch")
    path = tmp_path / "m.arch"
    path.write_text(SPEC.format(dim="10 ** 12"))  # 512 TB of weights: more than any address space
    rc, _, err = run(capsys, "train", str(path), "--steps", "1", "--out", os.fspath(tmp_path / "run"))
    assert rc == 1 and "lmspec train: error: out of memory" in err and "internal error" not in err
