"""`lmspec diff OLD NEW`: every verdict is checked against what loading a real checkpoint does."""
from __future__ import annotations

import json
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from lmspec.compiler import load_spec
from lmspec.runtime.cli.main import main

ROOT = Path(__file__).resolve().parents[3]
# specs/tiny.arch (a copy, so that edits of the shipped spec leave these cases alone), small enough
# to train two steps in a moment
SMALL = """model tiny {
  vocab = 128; context = 16; dim = 16; heads = 2; layers = 2; dropout = 0.0

  input tokens: i64[batch, seq <= context]

  x = dropout(embedding(tokens, vocab, dim) as wte + position(seq, context, dim) as wpe, dropout)
  repeat layers as block {
    x = x + attention(layernorm(x), heads, causal=true)
    x = x + mlp(layernorm(x), 4 * dim, act=gelu)
  }
  logits = linear(layernorm(x) as ln_f, vocab, bias=false, tie=wte) as lm_head
  output logits: f32[batch, seq, vocab]
}
"""


@pytest.fixture(scope="module")
def old(tmp_path_factory) -> tuple[Path, Path]:
    """(OLD's spec, a run trained from it with `lmspec train`)."""
    tmp = tmp_path_factory.mktemp("diff")
    spec = tmp / "old.arch"
    spec.write_text(SMALL, encoding="utf-8")
    text = tmp / "text.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40, encoding="utf-8")
    run = tmp / "run"
    out = subprocess.run([sys.executable, "-m", "lmspec.runtime", "train", str(spec), "--set", "vocab=128",
                          "--data", str(text), "--out", str(run), "--steps", "2", "--batch", "2", "--warmup", "1",
                          "--eval-every", "1000", "--eval-batches", "1", "--no-progress", "--sample-tokens", "0"],
                         cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    return spec, run


def variant(old_spec: Path, name: str, edit) -> Path:
    path = old_spec.parent / f"{name}.arch"
    text = edit(SMALL)
    assert text != SMALL or name == "same"
    path.write_text(text, encoding="utf-8")
    return path


def loads(checkpoint: Path, spec: Path) -> bool:
    """What `train --resume` and `export` do: NEW's model, the checkpoint's weights, strictly."""
    from lmspec.compiler.lower import lower
    from lmspec.runtime.checkpoint.store import CheckpointError, load_checkpoint
    model = lower(load_spec(str(spec), {}, None))
    try:
        load_checkpoint(checkpoint).load_model(model)
    except CheckpointError:
        return False
    return True


def diff(capsys, *args) -> tuple[int, dict | str]:
    capsys.readouterr()
    rc = main(["diff", *map(str, args)])
    out = capsys.readouterr().out
    return rc, (json.loads(out) if "json" in args else out)


CASES = {
    "same": (lambda s: s, False),
    "hyper_renamed": (lambda s: re.sub(r"\bdim\b", "width", s), False),
    "dropout_changed": (lambda s: s.replace("dropout = 0.0", "dropout = 0.1"), False),
    "dim_changed": (lambda s: s.replace("dim = 16", "dim = 24"), True),
    "layer_added": (lambda s: s.replace("layers = 2", "layers = 3"), True),
    "untied": (lambda s: s.replace(", tie=wte", ""), True),
    "module_renamed": (lambda s: s.replace("as ln_f", "as final_norm"), True),
}


@pytest.mark.parametrize("case", CASES)
def test_verdict_matches_loading(case, old, capsys):
    spec, run = old
    edit, breaking = CASES[case]
    new = variant(spec, case, edit)
    assert loads(run, new) is not breaking  # what really happens
    for side in (run, spec):  # the checkpoint's own tensors, and the spec it came from
        rc, result = diff(capsys, side, new, "--format", "json")
        assert rc == 0 and result["breaking"] is breaking, result["reasons"]
        assert bool(result["reasons"]) is breaking
    if case == "hyper_renamed":
        assert result["hyper"]["renamed"] == [{"old": "dim", "new": "width"}] and not result["reshaped"]
    if case == "dropout_changed":
        assert result["hyper"]["changed"] == {"dropout": {"old": 0.0, "new": 0.1}}
    if case == "dim_changed":
        assert {"name": "block.0.mlp.fc.weight", "old": [64, 16], "new": [96, 24]} in result["reshaped"]
        assert result["parameters"]["change"] > 0 and result["flops"]["percent"] > 0
    if case == "layer_added":
        assert len(result["added"]) == 12 and result["added"][0]["name"].startswith("block.2.")
        assert not result["removed"] and result["hyper"]["changed"] == {"layers": {"old": 2, "new": 3}}
    if case == "untied":
        assert result["ties"]["untied"] == [{"name": "lm_head.weight", "was_tied_to": "wte.weight"}]
        assert result["parameters"]["change"] == 128 * 16 and "untied lm_head.weight" in result["reasons"][0]
    if case == "module_renamed":
        assert result["renamed"] == [{"old": "ln_f.weight", "new": "final_norm.weight", "shape": [16]},
                                     {"old": "ln_f.bias", "new": "final_norm.bias", "shape": [16]}]
        assert not result["added"] and not result["removed"] and "renamed ln_f.weight" in result["reasons"][0]


def test_a_renamed_tied_module_depends_on_the_name_the_checkpoint_stored(old, capsys, tmp_path):
    """`lmspec train` stores wte/lm_head's shared tensor as lm_head.weight, `import hf` as wte.weight:
    renaming wte loads the first and not the second, and diff says so for each."""
    from safetensors.numpy import load_file, save_file
    spec, run = old
    new = variant(spec, "embed", lambda s: s.replace("as wte", "as embed").replace("tie=wte", "tie=embed"))
    assert loads(run, new)
    _, result = diff(capsys, run, new, "--format", "json")
    assert not result["breaking"] and result["renamed"][0]["old"] == "wte.weight"

    step = next((run / "checkpoints").glob("step_*"))
    imported = tmp_path / "imported" / "checkpoints" / step.name
    shutil.copytree(step, imported)
    weights = load_file(step / "model.safetensors")
    weights["wte.weight"] = weights.pop("lm_head.weight")
    save_file(weights, imported / "model.safetensors")
    from lmspec.runtime.checkpoint.integrity import checksums_of  # the new file's checksum, as `import hf` records it
    record = json.loads((imported / "meta.json").read_text())
    (imported / "meta.json").write_text(json.dumps(record | {"checksums": checksums_of(imported)}))
    assert loads(spec.parent / "run", spec) and loads(imported, spec)  # each loads into OLD itself
    assert not loads(imported, new)
    _, result = diff(capsys, imported, new, "--format", "json")
    assert result["breaking"] and "renamed wte.weight → embed.weight" in result["reasons"][0]

    _, result = diff(capsys, spec, new, "--format", "json")  # a spec: both ways of storing count
    assert result["breaking"] and result["reasons"] == [
        "renamed wte.weight → embed.weight: a checkpoint's tensors would need these names mapped "
        "(checkpoints written by `lmspec import hf`)"]


def test_human_output_of_a_checkpoint_against_a_spec(old, capsys):
    spec, run = old
    new = variant(spec, "renamed", lambda s: s.replace("as ln_f", "as final_norm").replace("dim = 16", "dim = 24"))
    rc, out = diff(capsys, run, new)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0].startswith("old: model tiny  (checkpoint ") and "step_000002" in lines[0]
    assert lines[1] == f"new: model tiny  (spec {new})"
    assert "  changed  dim: 16 → 24" in lines
    assert "  reshaped block.{0-1}.mlp.fc.weight: [64, 16] → [96, 24]" in lines
    assert "  removed  ln_f.weight  [16]" in lines and "  added    final_norm.weight  [24]" in lines
    assert any(line.startswith("parameter count: 8,896 → ") for line in lines)
    assert "breaking: checkpoints of OLD do not load into NEW" in lines

    rc, out = diff(capsys, run, spec)
    assert rc == 0 and out.rstrip().endswith("compatible: checkpoints of OLD load into NEW")
    assert "parameter count: 8,896 (unchanged)" in out


def test_fail_on_breaking_and_json(old, capsys):
    spec, run = old
    bigger = variant(spec, "bigger", lambda s: s.replace("layers = 2", "layers = 4"))
    assert diff(capsys, run, bigger)[0] == 0
    assert diff(capsys, run, bigger, "--fail-on-breaking")[0] == 1
    assert diff(capsys, run, spec, "--fail-on-breaking")[0] == 0
    rc, result = diff(capsys, spec, spec, "--old-set", "layers=1", "--seq", "8", "--format", "json")
    assert rc == 0 and set(result) >= {"added", "removed", "reshaped", "renamed", "hyper", "parameters", "flops",
                                       "breaking", "reasons"}
    assert result["old"]["kind"] == result["new"]["kind"] == "spec"
    assert result["flops"]["seq_old"] == result["flops"]["seq_new"] == 8
    assert result["breaking"] and len(result["added"]) == 12  # a checkpoint of 1 layer lacks layer 2


def test_bad_input_is_one_clear_error(old, capsys):
    spec, run = old
    broken = ROOT / "tests" / "broken_specs" / "shape_mismatch.arch"
    assert main(["diff", str(broken), str(spec)]) == 1
    err = capsys.readouterr().err
    assert "shape_mismatch.arch:7:7: error" in err and "^" in err and "Traceback" not in err

    for path, message in ((spec.parent / "no-such-run", "no such file or directory"),
                          (ROOT / "tests" / "broken_specs", "neither a spec file nor a checkpoint")):
        assert main(["diff", str(path), str(spec)]) == 1
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and err.startswith("lmspec diff: error: ") and message in err
    assert main(["diff", str(run), str(spec), "--old-set", "dim=8"]) == 2  # overrides are a spec's
    assert "--old-set applies to a spec" in capsys.readouterr().err


def test_diff_never_imports_torch(old):
    spec, run = old
    code = ("import sys; from lmspec.runtime.cli import main; "
            f"assert main(['diff', {str(spec)!r}, {str(ROOT / 'specs' / 'gpt2.arch')!r}]) == 0; "
            f"assert main(['diff', {str(run)!r}, {str(spec)!r}, '--format', 'json']) == 0; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr


def test_pure_diff_folds_a_renamed_repeat_and_takes_a_tensor_listing():
    from lmspec.compiler.spec_diff import fold_rows, spec_diff
    old = load_spec("old.arch", {}, None, sources={"old.arch": SMALL})
    new = load_spec("new.arch", {}, None, sources={"new.arch": SMALL.replace("as block", "as layer")})
    d = spec_diff(old, new)
    assert d.breaking and len(d.renamed) == 24 and not d.added and not d.removed
    rows = fold_rows([((r.old, r.new), r.shape) for r in d.renamed])
    assert rows[0] == (("block.{0-1}.ln.weight", "layer.{0-1}.ln.weight"), (16,))

    stored = {n: p.shape for n, p in old.params.items() if n != "wte.weight"}  # as `lmspec train` saves it
    assert not spec_diff(stored, old).breaking
    d = spec_diff({**stored, "extra.weight": (3,)}, old)
    assert d.breaking and d.removed == [("extra.weight", (3,))] and d.flops_old is None
