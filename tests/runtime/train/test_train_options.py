"""`lmspec train`'s ways of running: activation checkpointing, mixed precision (bf16, fp16 with
loss scaling), torch.compile; each through the real command line, with the run files read back."""
import json
import os
from pathlib import Path

import pytest
from safetensors.torch import load_file

from runtime_helpers import SMALL, VERDICT, lmspec_cli, losses

COMMON = ["specs/tiny.arch", *SMALL, "--data", str(VERDICT), "--steps", "20", "--warmup", "2", "--batch", "4",
          "--eval-every", "10", "--ckpt-every", "10", "--no-progress", "--sample-tokens", "0"]


def train(run: Path, *extra):
    out = lmspec_cli("train", *COMMON, "--out", str(run), *extra)
    assert out.returncode == 0, out.stderr
    return losses(run)


@pytest.mark.slow  # the same property is checked per block in tests/compiler and under FSDP in test_distributed
def test_activation_checkpointing_leaves_every_loss_the_same(tmp_path):
    assert train(tmp_path / "a", "--set", "dropout=0.1") == train(tmp_path / "b", "--set", "dropout=0.1",
                                                                  "--activation-checkpointing")
    meta = json.loads((tmp_path / "b" / "checkpoints" / "step_000020" / "meta.json").read_text())
    assert meta["train_config"]["activation_checkpointing"] == "all"
    weights = [load_file(str(tmp_path / run / "checkpoints" / "step_000020" / "model.safetensors")) for run in "ab"]
    assert weights[0].keys() == weights[1].keys()  # the same parameter names


@pytest.mark.slow  # the fp16 test covers autocast and resumes; bf16 needs no loss scale
def test_bf16_trains_like_fp32(tmp_path):
    fp32, bf16 = train(tmp_path / "a"), train(tmp_path / "b", "--precision", "bf16")
    assert bf16 != fp32  # autocast did run in bf16
    assert bf16[20] < bf16[10] and bf16[20] == pytest.approx(fp32[20], rel=0.02)


@pytest.mark.slow  # fp16 is a GPU precision; exact resume is checked in fp32 (test_train) and on a GPU (tests/gpu)
def test_fp16_resumes_exactly_with_its_loss_scale(tmp_path):
    whole = train(tmp_path / "whole", "--precision", "fp16")
    part = tmp_path / "part"
    first = lmspec_cli("train", *COMMON, "--out", str(part), "--precision", "fp16")
    assert first.returncode == 0, first.stderr
    (part / "checkpoints" / "latest").write_text("step_000010\n")  # as if stopped at step 10
    rng = load_file(str(part / "checkpoints" / "step_000010" / "rng.safetensors"))
    assert float(rng["grad_scaler_scale"]) > 1  # the scaler's state is part of the checkpoint
    resumed = lmspec_cli("train", *COMMON, "--out", str(part), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    assert losses(part) == whole


def test_sixteen_bit_precision_on_a_cpu_without_its_instructions_is_noted(tmp_path, monkeypatch):
    import torch

    from lmspec.runtime.train.steps import slow_autocast_note

    # the CLI says it where this machine's CPU lacks bf16 instructions (an AVX2 CPU: 12x slower than fp32)
    native = torch.ops.mkldnn._is_mkldnn_bf16_supported()
    out = lmspec_cli("train", "specs/tiny.arch", *SMALL, "--data", str(VERDICT), "--steps", "1", "--batch", "2",
                     "--eval-batches", "1", "--no-progress", "--sample-tokens", "0", "--precision", "bf16",
                     "--out", str(tmp_path / "r"))
    assert out.returncode == 0, out.stderr
    noted = "note: this CPU has no bf16 matrix instructions, so --precision bf16 runs many times slower here"
    assert (noted in out.stdout) != native, out.stdout
    # and the rule, whatever this CPU has
    for precision in ("bf16", "fp16"):
        monkeypatch.setattr(torch.ops.mkldnn, f"_is_mkldnn_{precision}_supported", lambda: False)
        assert f"--precision {precision} runs many times slower" in slow_autocast_note(torch.device("cpu"), precision)
        assert slow_autocast_note(torch.device("cuda"), precision) is None  # a GPU has them
        monkeypatch.setattr(torch.ops.mkldnn, f"_is_mkldnn_{precision}_supported", lambda: True)
        assert slow_autocast_note(torch.device("cpu"), precision) is None
    assert slow_autocast_note(torch.device("cpu"), "fp32") is None


def test_a_bad_policy_is_a_clear_error(tmp_path):
    out = lmspec_cli("train", *COMMON, "--out", str(tmp_path / "r"), "--activation-checkpointing", "block.7")
    assert out.returncode == 1 and "block.7 names no block" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow
def test_compile_trains_like_eager(tmp_path):
    eager, compiled = train(tmp_path / "a"), train(tmp_path / "b", "--compile")
    assert compiled[20] == pytest.approx(eager[20], rel=1e-3)


def test_a_compiler_that_cannot_run_is_one_line_and_no_checkpoint(tmp_path):
    # as on a machine with no C++ compiler (inductor's CPU code) or a broken Triton: the compiler's
    # failure, not "internal error"; a fresh cache, so no graph compiled by another test is reused
    env = {**os.environ, "CXX": str(tmp_path / "no-compiler"), "TORCHINDUCTOR_CACHE_DIR": str(tmp_path / "cache")}
    out = lmspec_cli("train", *COMMON, "--out", str(tmp_path / "r"), "--compile", env=env)
    assert out.returncode == 1 and "Traceback" not in out.stderr, out.stderr
    last = out.stderr.strip().splitlines()[-1]
    assert last.startswith("lmspec train: error: --compile: torch.compile cannot compile the model here "
                           "(InvalidCxxCompiler: No working C++ compiler found") and last.endswith("train without --compile")
    assert not list((tmp_path / "r").glob("checkpoints/step_*"))
