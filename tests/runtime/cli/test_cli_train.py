"""`lmspec train` and `lmspec sample` as a user runs them: real processes (some mistakes, which need
no process of their own, through main() in this one), files read back."""
import json
import os
import re
import signal
import subprocess
import sys
import time

import pytest

from runtime_helpers import ROOT, SMALL, VERDICT, lmspec_cli, lmspec_main, losses


def test_train_writes_checkpoint_log_and_plot_then_samples(tmp_path):
    run = tmp_path / "run"
    out = lmspec_cli("train", "specs/tiny.arch", *SMALL, "--data", str(VERDICT), "--out", str(run), "--steps",
                     "30", "--warmup", "5", "--eval-every", "10", "--ckpt-every", "10", "--batch", "8", "--no-progress",
                     "--sample-tokens", "0")
    assert out.returncode == 0, out.stderr
    assert (run / "loss.png").stat().st_size > 1000
    steps = losses(run)
    assert sorted(steps)[-1] == 30 and steps[30] < steps[min(steps)]
    meta = json.loads((run / "checkpoints" / "step_000030" / "meta.json").read_text())
    assert meta["spec"]["overrides"]["layers"] == 2 and "specs/tiny.arch" in meta["spec"]["sources"]

    a = lmspec_cli("sample", str(run), "--prompt", "I had", "--max-tokens", "40", "--seed", "7")
    b = lmspec_main("sample", str(run), "--prompt", "I had", "--max-tokens", "40", "--seed", "7")  # in process
    assert a.returncode == 0, a.stderr
    assert a.stdout == b.stdout and a.stdout.startswith("I had") and len(a.stdout.rstrip("\n")) == 45

    again = lmspec_main("train", "specs/tiny.arch", "--data", str(VERDICT), "--out", str(run))
    assert again.returncode != 0 and "--resume" in again.stderr  # never overwrites a run


@pytest.mark.parametrize("args, message", [
    (["train", "specs/tiny.arch", "--data", "no/such.txt"], "no/such.txt: no such file"),
    (["train", "specs/tiny.arch", "--set", "layer=3"], "no hyper-parameter 'layer'"),
    (["train", "specs/tiny.arch", "--seq", "4096", "--data", str(VERDICT)], "longer than the model's context"),
    (["sample", "no/such/run"], "no/such/run: no such file or directory"),
    (["train", "tests/broken_specs/shape_mismatch.arch"], "shape_mismatch.arch:7:7: error"),
])
def test_bad_input_is_a_clear_error(args, message, tmp_path):
    run = lmspec_cli if "no/such.txt" in args else lmspec_main  # one case as a real process
    out = run(*args, "--out", str(tmp_path / "r")) if args[0] == "train" else run(*args)
    assert out.returncode != 0
    assert message in out.stderr
    assert "Traceback" not in out.stderr


def test_a_run_that_diverges_ends_in_one_line_and_writes_no_checkpoint(tmp_path):
    # a learning rate of a million: before, the run wrote a NaN checkpoint and ended in "internal error"
    # while sampling from it
    run = tmp_path / "run"
    out = lmspec_main("train", "specs/tiny.arch", *SMALL, "--data", str(VERDICT), "--out", str(run), "--steps", "6",
                      "--lr", "1e6", "--weight-decay", "0", "--no-progress", "--sample-tokens", "20")
    assert out.returncode == 1 and "Traceback" not in out.stderr and "internal error" not in out.stderr, out.stderr
    assert re.fullmatch(r"lmspec train: error: the (gradient norm|loss|validation loss) became (nan|inf|-inf) at "
                        r"step \d.*; try a lower learning rate.*\(no checkpoint was written\)",
                        out.stderr.strip().splitlines()[-1]), out.stderr
    assert not (run / "checkpoints").exists()


def test_corrupt_checkpoint_is_reported(tmp_path):
    run = tmp_path / "run"
    assert lmspec_main("train", "specs/tiny.arch", *SMALL, "--data", str(VERDICT), "--out", str(run), "--steps", "2",
                       "--no-progress", "--sample-tokens", "0").returncode == 0
    weights = run / "checkpoints" / "step_000002" / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[:100])
    out = lmspec_main("sample", str(run))
    assert out.returncode == 1 and "model.safetensors" in out.stderr and "Traceback" not in out.stderr


@pytest.mark.slow  # exact resume is checked in process (test_train); this adds a real SIGKILL
def test_sigkill_then_resume_continues_the_same_loss_curve(tmp_path):
    common = ["train", "specs/tiny.arch", *SMALL, "--data", str(VERDICT), "--steps", "300", "--warmup", "20",
              "--eval-every", "50", "--ckpt-every", "25", "--batch", "4", "--threads", "1", "--no-progress",
              "--sample-tokens", "0", "--set", "dropout=0.1"]
    whole = tmp_path / "whole"
    assert lmspec_cli(*common, "--out", str(whole)).returncode == 0

    cut = tmp_path / "cut"
    proc = subprocess.Popen([sys.executable, "-m", "lmspec.runtime.cli", *common, "--out", str(cut)], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    latest = cut / "checkpoints" / "latest"
    deadline = time.time() + 120
    while time.time() < deadline and not (latest.exists() and latest.read_text().strip() >= "step_000100"):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    killed_at = max(losses(cut))
    assert killed_at < 300, "the run finished before it could be killed"

    # whatever the moment of the kill, every checkpoint on disk is complete and loads
    from lmspec.runtime.checkpoint.store import load_checkpoint
    for step_dir in sorted((cut / "checkpoints").glob("step_*")):
        assert load_checkpoint(step_dir).step == int(step_dir.name.split("_")[1])

    resumed = lmspec_cli(*common, "--out", str(cut), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    a, b = losses(whole), losses(cut)
    assert sorted(a) == sorted(b)
    assert max(abs(a[s] - b[s]) for s in a) <= 1e-6


def test_train_with_a_tokenizer_file(tmp_path):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers, decoders
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train([str(VERDICT)], trainers.BpeTrainer(vocab_size=300, special_tokens=["<|endoftext|>"],
                                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tok.save(str(tmp_path / "tok.json"))
    run = tmp_path / "run"
    out = lmspec_main("train", "specs/tiny.arch", *SMALL, "--data", str(VERDICT), "--tokenizer",
                      str(tmp_path / "tok.json"), "--out", str(run), "--steps", "3", "--no-progress", "--sample-tokens", "0")
    assert out.returncode == 0, out.stderr
    assert f"vocab = {tok.get_vocab_size()}" in out.stdout
    sample = lmspec_main("sample", str(run), "--prompt", "I had always", "--max-tokens", "5", "--seed", "1")
    assert sample.returncode == 0, sample.stderr
    assert sample.stdout.startswith("I had always")
