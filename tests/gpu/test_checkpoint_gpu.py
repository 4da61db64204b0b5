"""A checkpoint trained on a GPU, used through the real command line: sampled and measured on the GPU
(against the CPU), finetuned into a classifier there, and exported to ONNX, which loads on the CPU."""
from __future__ import annotations

import json
import math

import pytest

from .gpu_helpers import DEVICE, ON_GPU, SMS, VERDICT, lmspec

PROMPT = "I had"
# TF32 matrix products on the GPU (runtime/distributed/device.py turns them on) round the inputs to 10 bits of
# mantissa: a mean cross-entropy over thousands of tokens moves by ~1e-4, perplexity relatively as much
TF32_REL = 2e-3
CHARACTERS = 62  # the-verdict.txt's alphabet: the vocabulary of a character model trained on it


def test_sampling_on_the_device_decodes_the_corpus_characters(device_run):
    args = ("sample", device_run.path, "--prompt", PROMPT, "--max-tokens", "40", "--seed", "7", "--device", DEVICE)
    a, b = lmspec(*args), lmspec(*args)
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout  # the seeded generator lives on the device
    assert a.stdout.startswith(PROMPT) and len(a.stdout) == len(PROMPT) + 40 + 1  # one character a token
    assert set(a.stdout) <= set(VERDICT.read_text(encoding="utf-8")) | {"\n"}


def _perplexity(run, device: str) -> dict:
    out = lmspec("eval", run, "--data", VERDICT, "--max-tokens", "4000", "--format", "json", "--device", device)
    assert out.returncode == 0, out.stderr
    return json.loads(out.stdout)


def test_eval_on_the_device_measures_what_the_cpu_does(device_run):
    gpu, cpu = _perplexity(device_run.path, DEVICE), _perplexity(device_run.path, "cpu")
    assert gpu["tokens"] == cpu["tokens"] == 4000 and gpu["windows"] == cpu["windows"]
    assert math.isfinite(gpu["perplexity"]) and gpu["cross_entropy"] < math.log(CHARACTERS)  # better than chance
    assert gpu["perplexity"] == (pytest.approx(cpu["perplexity"], rel=TF32_REL) if ON_GPU else cpu["perplexity"])


def _predictions(stdout: str) -> list[tuple[str, float]]:
    rows = [line.split(maxsplit=2) for line in stdout.strip().splitlines()]
    return [(label, float(prob)) for label, prob, _ in rows]


def test_finetune_classify_on_the_device_then_classify(device_run, tmp_path):
    out = tmp_path / "spam"
    trained = lmspec("finetune", "classify", device_run.path, "--data", SMS, "--labels", "ham,spam", "--balance",
                     "--limit", "48", "--epochs", "1", "--max-length", "24", "--no-progress", "--out", out,
                     "--device", DEVICE)
    assert trained.returncode == 0, trained.stderr
    confusion = json.loads((out / "confusion.json").read_text())
    for name, count in (("train", 33), ("validation", 4), ("test", 11)):
        split = confusion["splits"][name]
        assert sum(map(sum, split["matrix"])) == split["count"] == count
        assert split["accuracy"] == pytest.approx((split["matrix"][0][0] + split["matrix"][1][1]) / count)
    meta = next((out / "checkpoints").glob("step_*/meta.json")).read_text()
    assert "cuda" not in meta  # no device in the record: a classifier finetuned on a GPU loads anywhere

    texts = ("WINNER!! claim your free prize now", "ok see you at 6")
    on_device, on_cpu = (lmspec("classify", out, *texts, "--device", d) for d in (DEVICE, "cpu"))
    assert on_device.returncode == 0 and on_cpu.returncode == 0, on_device.stderr + on_cpu.stderr
    got, want = _predictions(on_device.stdout), _predictions(on_cpu.stdout)
    assert len(got) == 2 and all(label in ("ham", "spam") and 0.5 <= p <= 1 for label, p in got)
    for (label, p), (cpu_label, q) in zip(got, want):
        # printed to 3 decimals; TF32 moves a probability by far less than that, and can change
        # the label only of a text the classifier finds a toss-up
        assert (label == cpu_label and abs(p - q) <= 0.0015) or max(p, q) <= 0.5015, (got, want)


def test_a_gpu_checkpoint_exports_and_generates_like_pytorch(device_run, tmp_path):
    bundle = tmp_path / "tiny.onnx"
    exported = lmspec("export", device_run.path, "-o", bundle)  # loads on the CPU, checks parity with torch
    assert exported.returncode == 0, exported.stderr
    assert bundle.is_file() and bundle.with_name("tiny.lmspec.json").is_file()

    greedy = ("--prompt", PROMPT, "--max-tokens", "32", "--temperature", "0")
    torch_cpu = lmspec("sample", device_run.path, *greedy, "--device", "cpu")
    onnx_cpu = lmspec("generate", bundle, *greedy)
    assert torch_cpu.returncode == 0 and onnx_cpu.returncode == 0, torch_cpu.stderr + onnx_cpu.stderr
    assert onnx_cpu.stdout == torch_cpu.stdout and len(onnx_cpu.stdout) == len(PROMPT) + 32 + 1

    import onnxruntime
    onnx_gpu = lmspec("generate", bundle, *greedy, "--provider", "cuda")
    if "CUDAExecutionProvider" in onnxruntime.get_available_providers():
        assert onnx_gpu.returncode == 0, onnx_gpu.stderr
        # onnxruntime's CUDA provider computes in TF32 by default: greedy picks may part at a near-tie
        # further on, so the start and the length are what must agree
        assert len(onnx_gpu.stdout) == len(onnx_cpu.stdout)
        assert onnx_gpu.stdout[:len(PROMPT) + 4] == onnx_cpu.stdout[:len(PROMPT) + 4]
    else:  # the CPU build of onnxruntime: one clear line, not a silent fall-back to the CPU
        assert onnx_gpu.returncode != 0 and onnx_gpu.stdout == ""
        assert "onnxruntime-gpu" in onnx_gpu.stderr and onnx_gpu.stderr.count("\n") == 1
