"""`export --quantize` reports what quantising costs: fp32, int8 and int4 side by side (size, loss on
held-out text and its change, greedy decode speed), the held-out text being the run's validation split
(or a file given), the fp32 loss the one PyTorch computes on the same windows; without held-out text,
sizes and speeds and the reason there is no loss; `report=False` skips it."""
import json
import math
import re

import numpy as np
import pytest
import torch

from runtime_helpers import SHARED_DATA
from lmspec.runtime.checkpoint.models import load_model
from lmspec.runtime.cli.main import main
from lmspec.runtime.data.tokenizer import load_tokenizer
from lmspec.runtime.export.bundle import bundle_sidecar
from lmspec.runtime.export.from_checkpoint import export_bundle
from lmspec.runtime.serve.quantized_report import held_out, report_on_quantizing

from test_export import _char_tokenizer, random_checkpoint


def torch_loss(model, ids: np.ndarray, seq: int, count: int) -> tuple[float, list[int]]:
    """The mean next-token cross-entropy of `model` over `count` windows of `seq` tokens evenly spaced
    over `ids`, and their starts."""
    starts = np.linspace(0, len(ids) - seq - 1, count).round().astype(int).tolist()
    x = torch.tensor(np.stack([ids[s:s + seq] for s in starts]))
    y = torch.tensor(np.stack([ids[s + 1:s + seq + 1] for s in starts]))
    with torch.no_grad():
        logits = model.eval()(x)
    return torch.nn.functional.cross_entropy(logits.double().flatten(0, 1), y.flatten()).item(), starts


def test_int8_export_reports_fp32_int8_int4_on_the_runs_validation_split(tiny_run, tmp_path, capsys):
    """tiny_run: the character model `lmspec train` fitted to the-verdict.txt; held out: the last tenth
    of its tokens, as train cut them."""
    assert main(["export", str(tiny_run), "-o", str(tmp_path / "q8"), "--quantize", "int8"]) == 0  # the CLI's path
    messages = capsys.readouterr().out.splitlines()
    report = json.loads(bundle_sidecar(tmp_path / "q8" / "model.onnx").read_text())["quantization_report"]
    assert [row["model"] for row in report["rows"]] == ["fp32", "int8", "int4"] and report["installed"] == "int8"
    held = report["held_out"]
    assert "the-verdict.txt (the validation split of the run it was trained on)" in held["source"]
    assert (held["windows"], held["seq"]) == (16, 64) and report["no_loss"] is None

    loaded = load_model(str(tiny_run))
    ids = np.array(load_tokenizer(loaded.checkpoint.tokenizer).encode((SHARED_DATA / "the-verdict.txt").read_text()))
    validation = ids[int(len(ids) * 0.9):]  # lmspec train's 90/10 cut
    expected, starts = torch_loss(loaded.model, validation, 64, 16)
    assert held["starts"] == starts
    fp32, int8, int4 = report["rows"]
    assert abs(fp32["loss"] - expected) <= 1e-4 and fp32["loss_change_pct"] == 0.0
    assert expected < 3.0  # trained: far below the uniform ln(96) = 4.56
    for row in (int8, int4):
        assert math.isfinite(row["loss"]) and abs(row["loss_change_pct"]) < 5.0
        assert row["loss_change_pct"] == pytest.approx(100 * (row["loss"] - fp32["loss"]) / fp32["loss"])
    assert all(row["tokens_per_s"] > 0 and row["size_mib"] > 0 for row in report["rows"])
    assert int4["size_mib"] < fp32["size_mib"] and int8["size_mib"] < fp32["size_mib"]
    assert report["decode"] == {"batch": 1, "prompt_tokens": 8, "new_tokens": 32}
    table = "\n".join(messages)
    assert "what quantizing costs (loss on 16 windows of 64 tokens of" in table
    assert any(m.startswith("  int8 ") and m.endswith("(installed)") for m in messages)
    assert any(m.startswith("  int4 ") and " tok/s" in m for m in messages)
    # only the asked-for model is installed: the others were built and measured in the scratch directory
    assert sorted(p.name for p in (tmp_path / "q8").iterdir() if p.suffix in (".onnx", ".data")) == ["model.onnx"]


def test_without_held_out_text_sizes_and_speeds_and_why_no_loss(tmp_path, capsys):
    random_checkpoint(tmp_path / "run", "specs/tiny.arch", {"layers": 1, "vocab": 96, "context": 32},
                      tokenizer=_char_tokenizer())
    messages = []
    meta = export_bundle(str(tmp_path / "run"), str(tmp_path / "q4.onnx"), quantize="int4", log=messages.append,
                         measure=report_on_quantizing(str(tmp_path / "run"), None, "int4", log=messages.append))
    report = meta["quantization_report"]
    assert report["held_out"] is None and [r["model"] for r in report["rows"]] == ["fp32", "int8", "int4"]
    assert all("loss" not in row and row["tokens_per_s"] > 0 for row in report["rows"])
    assert "no loss: the checkpoint's run records no training data" in "\n".join(messages)
    assert "name held-out text with --eval-data FILE" in report["no_loss"]

    # a file given is held out whole: windows of min(context, 256) tokens evenly over all of it
    loaded = load_model(str(tmp_path / "run"))
    text = SHARED_DATA / "the-verdict.txt"
    held, why = held_out(loaded.checkpoint, _char_tokenizer(), 32, str(text))
    ids = np.array(_char_tokenizer().encode(text.read_text()))
    assert why is None and held.seq == 32 and held.starts == torch_loss(loaded.model, ids, 32, 16)[1]
    assert held.windows.shape == (16, 33) and (held.windows[3] == ids[held.starts[3]:held.starts[3] + 33]).all()

    # without a measure, no report; --eval-data without a report to give is refused before any export
    meta = export_bundle(str(tmp_path / "run"), str(tmp_path / "plain.onnx"), quantize="int8", log=messages.append)
    assert "quantization_report" not in meta
    for flags, says in ((["--eval-data", str(text)], "--eval-data: .* and no --quantize was given"),
                        (["--quantize", "int4", "--no-report", "--eval-data", str(text)], "which --no-report skips"),
                        (["--quantize", "int4", "--eval-data", str(tmp_path / "missing.txt")], "missing.txt")):
        assert main(["export", str(tmp_path / "run"), "-o", str(tmp_path / "x.onnx"), *flags]) in (1, 2)
        [line] = capsys.readouterr().err.strip().splitlines()
        assert line.startswith("lmspec export: error: ") and re.search(says, line), line
        assert not (tmp_path / "x.onnx").exists()
