"""`lmspec train` on its device, checked on the CPU: the device option, the hardware metrics, a
vocabulary padded for the GPU that no other verb sees, and running out of memory."""
import json
import math
import re
import sys
from pathlib import Path

import pytest
import torch

from lmspec.runtime.cli.main import main

ROOT = Path(__file__).resolve().parents[3]
VERDICT = ROOT.parent / "shared" / "data" / "the-verdict.txt"
SMALL = ["--set", "layers=2", "--set", "dim=32", "--set", "heads=2", "--set", "context=32"]
NO_CUDA = pytest.mark.skipif(torch.cuda.is_available(), reason="checks the error of a machine without CUDA")


def _rows(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def _train(run: Path, *extra: str) -> int:
    return main(["train", "specs/tiny.arch", *SMALL, "--data", str(VERDICT), "--out", str(run), "--batch", "4",
                 "--eval-every", "10", "--eval-batches", "2", "--ckpt-every", "10", "--no-progress",
                 "--sample-tokens", "0", *extra])


@pytest.fixture(scope="module")
def padded_run(tmp_path_factory):
    """A run with a padded vocabulary, MFU against a given peak, trained 20 steps then resumed to 30."""
    run = tmp_path_factory.mktemp("padded") / "run"
    assert _train(run, "--steps", "20", "--pad-vocab", "64", "--peak-tflops", "0.5", "--device", "cpu") == 0
    return run


def test_metrics_say_how_the_hardware_is_used(padded_run, capsys):
    from lmspec.compiler.analysis import flops_per_token
    from lmspec.compiler.rewrites import graph_from_record
    rows = _rows(padded_run)
    assert [r["step"] for r in rows] == [10, 20]
    meta = json.loads((padded_run / "checkpoints" / "step_000020" / "meta.json").read_text())
    graph = graph_from_record(meta["spec"])
    for r in rows:
        assert r["tokens_per_s"] > 0 and r["lr"] > 0
        assert math.isfinite(r["grad_norm"]) and r["grad_norm"] > 0
        assert r["peak_memory_bytes"] > 50e6  # the process's resident set: torch alone is more
        # MFU from the graph's FLOPs: 3 x forward FLOPs per token at the run's sequence, over 0.5 TFLOP/s
        assert r["mfu"] == pytest.approx(r["tokens_per_s"] * 3 * flops_per_token(graph, 32) / 0.5e12, rel=1e-9)


def test_a_padded_vocabulary_is_seen_only_by_training(padded_run, tmp_path, capsys):
    from safetensors import safe_open
    step = padded_run / "checkpoints" / "step_000020"
    meta = json.loads((step / "meta.json").read_text())
    real = meta["spec"]["vocab_padding"]["vocab"]
    assert meta["spec"]["overrides"]["vocab"] == 64 and real < 64 and meta["spec"]["vocab_padding"]["multiple"] == 64
    with safe_open(str(step / "model.safetensors"), "pt") as f:
        assert {f.get_slice(k).get_shape()[0] for k in f.keys() if "wte" in k or "lm_head" in k} == {64}

    # sample and eval build the real model: no padded id can come out, and the numbers are the model's
    assert main(["sample", str(padded_run), "--max-tokens", "30", "--seed", "1", "--temperature", "2"]) == 0
    capsys.readouterr()
    assert main(["eval", str(padded_run), "--data", str(VERDICT), "--format", "json", "--max-tokens", "2000"]) == 0
    out = capsys.readouterr().out
    assert math.isfinite(json.loads(out[out.index("{"):])["perplexity"])
    # the export takes the first rows: its logits have the tokenizer's width
    assert main(["export", str(padded_run), "-o", str(tmp_path / "m.onnx")]) == 0
    import onnx
    logits = next(o for o in onnx.load(str(tmp_path / "m.onnx"), load_external_data=False).graph.output
                  if o.name == "logits")
    assert logits.type.tensor_type.shape.dim[-1].dim_value == real

    # finetuning starts from the real model, and records it
    from runtime_helpers import finetune_spam
    assert finetune_spam(padded_run, tmp_path / "spam") == 0
    spam = json.loads(next((tmp_path / "spam" / "checkpoints").glob("step_*/meta.json")).read_text())
    assert "vocab_padding" not in spam["spec"] and spam["spec"]["overrides"]["vocab"] == real

    # resuming trains the padded model on, from the record
    assert _train(padded_run, "--steps", "30", "--resume") == 0
    resumed = json.loads((padded_run / "checkpoints" / "step_000030" / "meta.json").read_text())
    assert resumed["spec"]["vocab_padding"] == meta["spec"]["vocab_padding"]


def test_the_run_prints_the_planned_and_the_measured_memory(tmp_path, capsys):
    from runtime_helpers import a_past_peak

    peak_before = a_past_peak()
    assert _train(tmp_path / "run", "--steps", "2") == 0
    out = capsys.readouterr().out
    predicted = float(re.search(r"^memory: lmspec plan predicts ([\d.]+) GB per CPU for this run$", out, re.M)[1])
    # on the CPU, the peak resident set, and how much of it is above what the process held before the run
    line = re.search(r"^peak memory ([\d.]+) GB on cpu, ([\d.]+) GB above the ([\d.]+) GB held before the model "
                     r"and data \(lmspec plan predicted ([\d.]+) GB\), \d+ s$", out, re.M)
    assert line, out
    peak, above, held, planned = map(float, line.groups())
    # (this warm process may add almost nothing: its allocator reuses what earlier tests freed)
    assert planned == predicted and 0 <= above < peak and abs(held + above - peak) <= 0.011
    if sys.platform == "linux":  # the high-water mark was reset at the start: the run's own peak, in the metrics too
        assert peak * 1e9 < peak_before - 256 * 2 ** 20
        assert max(r["peak_memory_bytes"] for r in _rows(tmp_path / "run")) < peak_before - 256 * 2 ** 20


def test_device_cpu_is_the_run_without_the_option(tmp_path):
    assert _train(tmp_path / "a", "--steps", "10") == 0
    assert _train(tmp_path / "b", "--steps", "10", "--device", "cpu") == 0
    a, b = _rows(tmp_path / "a"), _rows(tmp_path / "b")
    assert [(r["loss"], r["val_loss"], r["grad_norm"]) for r in a] == [(r["loss"], r["val_loss"], r["grad_norm"])
                                                                      for r in b]


@NO_CUDA
@pytest.mark.parametrize("verb", ["train", "sample"])
@pytest.mark.parametrize("device, message", [("cuda", "CUDA is not available"), ("cuda:1", "CUDA is not available"),
                                             ("tpu", "expected auto, cpu, cuda or cuda:N")])
def test_a_device_that_is_not_there_is_one_line(verb, device, message, tmp_path):
    from runtime_helpers import lmspec_cli, lmspec_main
    args = ["train", "specs/tiny.arch", "--out", tmp_path / "run"] if verb == "train" else ["sample", tmp_path]
    # one case as a real process, the others through main() in this one (2 s less each)
    out = (lmspec_cli if (verb, device) == ("train", "cuda") else lmspec_main)(*args, "--device", device)
    assert out.returncode == 2
    lines = out.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"lmspec {verb}: error: --device {device}") and message in lines[0]
    assert not (tmp_path / "run").exists()


def test_torchrun_with_one_rank_joins_a_process_group(tmp_path):
    import subprocess
    run = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                          "-m", "lmspec.runtime", "train", "specs/tiny.arch", *SMALL, "--data", str(VERDICT),
                          "--steps", "2", "--device", "cpu", "--no-progress", "--sample-tokens", "0",
                          "--out", str(tmp_path / "run")], cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]
    assert " on 1 rank over gloo" in run.stdout


def test_running_out_of_memory_names_the_batch_the_plan_and_the_checkpoint(tmp_path, capsys, monkeypatch):
    from lmspec.runtime.train import throughput
    from lmspec.runtime.train import loop as train

    run = tmp_path / "run"
    assert _train(run, "--steps", "10") == 0
    meta = json.loads((run / "checkpoints" / "step_000010" / "meta.json").read_text())
    from lmspec.compiler.rewrites import graph_from_record
    cfg = train.TrainConfig.from_dict(meta["train_config"])
    graph = graph_from_record(meta["spec"])
    # a device whose memory holds 2 sequences a step by the plan's estimate, but not the run's 4
    need = {b: throughput.predicted_memory(graph, cfg, 1, b) for b in (1, 2, 3, 4)}
    capacity = (need[2] + need[3]) / 2 / 0.9
    monkeypatch.setattr(throughput, "device_capacity", lambda device: capacity)

    def out_of_memory(*args, **kwargs):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    monkeypatch.setattr(train, "train", out_of_memory)
    capsys.readouterr()
    assert _train(run, "--steps", "20", "--resume") == 1
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1, err
    assert "out of memory on cpu" in err[0] and "--batch 4 x --seq 32" in err[0]
    assert f"lmspec plan predicts {need[4] / 1e9:.2f} GB" in err[0]
    assert "--batch 2 fits (with --grad-accum 2" in err[0]
    assert f"the last checkpoint, {run / 'checkpoints' / 'step_000010'}, is intact" in err[0]
