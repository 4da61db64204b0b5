"""`lmspec plan`: estimates read off the graph (parameters, FLOPs, compute, time, memory per GPU),
its units, its CLI and its errors. No torch here: tests/runtime/train/test_plan_memory.py measures."""
import json
import subprocess
import sys
import time
from pathlib import Path

import pytest

from lmspec.compiler import load_spec
from lmspec.compiler.analysis import flops_per_token, parameter_count
from lmspec.compiler.plan import activations, make_plan, parse_bytes, parse_count, parse_flops

ROOT = Path(__file__).resolve().parents[2]
SMALL_GPT = dict(layers=4, dim=256, heads=4, context=256, vocab=4096)


def plan_cli(*args):
    return subprocess.run([sys.executable, "-m", "lmspec.runtime.cli", "plan", *args], cwd=ROOT,
                          capture_output=True, text=True)


def spec(name, **overrides):
    return load_spec(str(ROOT / "specs" / f"{name}.arch"), overrides)


# ---------------------------------------------------------------- units

@pytest.mark.parametrize("text, value", [
    ("80GB", 80e9), ("80G", 80e9), ("80gb", 80e9), ("80GiB", 80 * 2**30), ("24 GiB", 24 * 2**30),
    ("512MiB", 512 * 2**20), ("1.5TB", 1.5e12), ("141GB", 141e9), ("1000000B", 1e6),
])
def test_memory_sizes(text, value):
    assert parse_bytes(text) == pytest.approx(value)


@pytest.mark.parametrize("text", ["80", "eighty GB", "80XB", "80iB", "GB", ""])
def test_memory_sizes_need_a_unit(text):
    with pytest.raises(ValueError, match="memory size"):
        parse_bytes(text)


@pytest.mark.parametrize("text, value", [
    ("2T", 2e12), ("15T", 15e12), ("300B", 300e9), ("15e12", 15e12), ("1.5M", 1.5e6), ("20k", 2e4),
    ("1_000_000", 1e6), ("1,000", 1e3), ("42", 42),
])
def test_token_counts(text, value):
    assert parse_count(text) == pytest.approx(value)


@pytest.mark.parametrize("text, value", [
    ("989e12", 989e12), ("989T", 989e12), ("989 TFLOPS", 989e12), ("1.98P", 1.98e15), ("3e24", 3e24),
    ("6e23 FLOPs", 6e23), ("312TFLOP/s", 312e12),
])
def test_flop_counts(text, value):
    assert parse_flops(text) == pytest.approx(value)


@pytest.mark.parametrize("parse, text", [(parse_count, "2X"), (parse_count, "many"), (parse_flops, "fast")])
def test_bad_counts(parse, text):
    with pytest.raises(ValueError):
        parse(text)


# ---------------------------------------------------------------- parameters, FLOPs, compute, time

@pytest.mark.parametrize("name, count", [
    ("llama3.2-1b", 1_235_814_400), ("llama3.1-8b", 8_030_261_248), ("llama3.1-70b", 70_553_706_496),
    ("mistral-7b", 7_241_732_096),
])
def test_parameters_and_flops_are_info_s(name, count):
    g = spec(name)
    p = make_plan(g, seq=4096)
    assert p.parameters == parameter_count(g) == count
    assert p.forward_flops_per_token == flops_per_token(g, 4096)
    assert p.training_flops_per_token == 3 * p.forward_flops_per_token
    # 6N plus attention: the parameters of matrix products are all but an untied embedding's
    assert 6 * p.matmul_params == pytest.approx(p.training_flops_per_token - p.attention_flops_per_token)
    assert 0.9 * count < p.matmul_params <= count
    assert p.attention_flops_per_token > 0


def test_budgets_tokens_and_compute_are_each_other_s_inverse():
    g = spec("llama3.1-8b")
    by_tokens = make_plan(g, seq=4096, gpus=64, tokens=15e12)
    chinchilla, tokens = by_tokens.budgets
    assert chinchilla.tokens == 20 * 8_030_261_248
    assert tokens.flops == pytest.approx(15e12 * by_tokens.training_flops_per_token)
    assert tokens.seconds == pytest.approx(tokens.flops / (64 * 989e12 * 0.4))
    by_compute = make_plan(g, seq=4096, gpus=64, compute=tokens.flops, mfu=0.5, gpu_flops=1979e12)
    back = by_compute.budgets[1]
    assert back.tokens == pytest.approx(15e12)
    assert back.seconds == pytest.approx(tokens.seconds * (0.4 * 989) / (0.5 * 1979))


# ---------------------------------------------------------------- memory

def _rows(p):
    return {(r.strategy, r.checkpointing): r for r in p.rows}


def test_state_bytes_per_parameter_under_ddp_and_fsdp():
    g = spec("llama3.1-8b")
    n = 8_030_261_248
    rows = _rows(make_plan(g, gpus=8, seq=4096))
    ddp, fsdp = rows["ddp", False], rows["fsdp", False]
    assert (ddp.weights, ddp.gradients, ddp.optimizer) == (4 * n, 4 * n, 8 * n)  # fp32 + two AdamW moments
    assert fsdp.optimizer == 8 * n / 8
    # sharded, plus the unsharded weights and gradients of the part outside the blocks and two blocks
    block = 218_112_000  # one Llama 3.1 8B layer
    outside = n - 32 * block
    assert fsdp.weights == pytest.approx(4 * n / 8 + 4 * (outside + 2 * block))
    assert fsdp.gradients == pytest.approx(4 * n / 8 + 4 * (outside + 2 * block))
    assert fsdp.activations == ddp.activations  # activations are not sharded
    bf16 = _rows(make_plan(g, gpus=8, seq=4096, precision="bf16"))
    # mixed precision keeps fp32 master weights and gradients; DDP adds autocast's 16-bit copies of the
    # matrices (all but the norms' gains and the embedding, which is not tied here)
    norms = 65 * 4096
    embedding = 128256 * 4096
    assert bf16["ddp", False].weights == 4 * n + 2 * (n - norms - embedding)
    assert bf16["ddp", False].gradients == 4 * n
    assert bf16["fsdp", False].weights == pytest.approx(4 * n / 8 + 2 * (outside + 2 * block))
    assert bf16["ddp", False].activations < rows["ddp", False].activations


def test_checkpointing_keeps_block_inputs_only():
    g = spec("llama3.1-8b")
    a = activations(g, 4096, 1, "bf16")
    assert len(a.blocks) == 32
    assert set(a.block_inputs.values()) == {4096 * 4096 * 4}  # the residual stream, fp32
    rows = _rows(make_plan(g, gpus=8, seq=4096, precision="bf16"))
    plain, ckpt = rows["ddp", False].activations, rows["ddp", True].activations
    assert plain == a.total(False) and ckpt == a.total(True)
    assert ckpt < plain / 3
    expected = a.outside + a.logits + 32 * 4096 * 4096 * 4 + max(a.loss_kept + a.loss_grads, max(a.blocks.values()))
    assert ckpt == expected


def test_logits_and_fp32_cross_entropy_are_counted():
    a = activations(spec("llama3.1-70b"), 4096, 1, "bf16")
    assert a.logits == 4096 * 128256 * 2  # bf16 logits, held by the training loop
    assert a.loss_kept == 4096 * 128256 * 4 + 4096 * 8  # fp32 log-probabilities, i64 targets
    assert a.loss_grads == 2 * 4096 * 128256 * 4  # the gradients of both, at the start of backward


def test_fused_attention_keeps_no_scores_hand_written_attention_does():
    # fused SDPA keeps q, k, v, the output and a log-sum-exp: a block's activations grow linearly with seq
    fused = [activations(spec("llama3.2-1b"), seq, 1) for seq in (1024, 2048)]
    assert fused[1].blocks["block.0"] == 2 * fused[0].blocks["block.0"]
    # written from matmul/softmax/causal_mask, the [seq, seq] scores are kept: more than linear
    hand = [activations(spec("handwritten", context=512), seq, 1) for seq in (256, 512)]
    assert hand[1].blocks["block.0"] > 2.5 * hand[0].blocks["block.0"]


def test_a_gpt2_block_by_the_rules():
    # one GPT-2 block, fp32, b*t tokens of width d (4d inside the MLP), dropout 0.1:
    # ln_1: x + mean + rstd; attention: ln_1's output, q/k/v (3d), log-sum-exp per head, output;
    # dropout mask (bool); ln_2 as ln_1; mlp: ln_2's output, fc's output (4d), gelu's (4d); dropout mask
    b, t, d, heads = 2, 64, 128, 4
    a = activations(spec("gpt2", layers=1, dim=d, heads=heads, context=64, vocab=512), t, b)
    n = b * t
    ln = 4 * n * d + 2 * 4 * n
    attention = 4 * n * d + 4 * n * 3 * d + 4 * b * heads * t + 4 * n * d
    mlp = 4 * n * d + 2 * 4 * n * 4 * d
    assert a.blocks["block.0"] == 2 * ln + attention + mlp + 2 * n * d


def test_memory_grows_with_micro_batch_not_with_gpus():
    g = spec("llama3.2-1b")
    one = _rows(make_plan(g, gpus=1, seq=2048, micro_batch=1))
    eight = _rows(make_plan(g, gpus=8, seq=2048, micro_batch=1))
    four = _rows(make_plan(g, gpus=1, seq=2048, micro_batch=4))
    assert one["ddp", False].total == eight["ddp", False].total
    assert eight["fsdp", False].total < one["fsdp", False].total
    assert four["ddp", False].activations == pytest.approx(4 * one["ddp", False].activations, rel=1e-6)


def test_fits_and_the_fewest_gpus_for_fsdp():
    p = make_plan(spec("llama3.1-70b"), gpus=8, gpu_memory=80e9, seq=4096, precision="bf16")
    assert all(r.fits(80e9) == "no" for r in p.rows)
    need = p.min_fsdp_gpus[True]
    assert need is not None and need > 8
    at = _rows(make_plan(spec("llama3.1-70b"), gpus=need, gpu_memory=80e9, seq=4096, precision="bf16"))
    below = _rows(make_plan(spec("llama3.1-70b"), gpus=need - 1, gpu_memory=80e9, seq=4096, precision="bf16"))
    assert at["fsdp", True].fits(80e9) == "yes" and below["fsdp", True].fits(80e9) != "yes"
    small = make_plan(spec("llama3.2-1b"), gpus=1, gpu_memory=80e9, seq=4096, precision="bf16")
    assert _rows(small)["ddp", True].fits(80e9) == "yes"


@pytest.mark.parametrize("name", ["llama3.2-1b", "llama3.1-8b", "llama3.1-70b", "mistral-7b"])
def test_big_specs_plan_well_under_a_second(name):
    start = time.perf_counter()
    make_plan(spec(name), gpus=8, seq=4096, precision="bf16", tokens=15e12)
    assert time.perf_counter() - start < 1.0


# ---------------------------------------------------------------- the CLI

def test_plan_prints_the_answer():
    out = plan_cli("specs/llama3.1-70b.arch", "--gpus", "8", "--gpu-memory", "80GB", "--seq", "4096",
                   "--tokens", "15T", "--precision", "bf16")
    assert out.returncode == 0, out.stderr
    text = out.stdout
    assert "parameters: 70,553,706,496" in text
    assert "6N plus attention" in text and "Chinchilla" in text and "--tokens" in text
    for row in ("ddp       no", "ddp       per block", "fsdp x8   no", "fsdp x8   per block"):
        assert row in text
    assert "GB (10^9 bytes)" in text


def test_plan_json_agrees_with_info():
    out = plan_cli("specs/gpt2.arch", *[f"--set={k}={v}" for k, v in SMALL_GPT.items()], "--micro-batch", "8",
                   "--compute", "1e18", "--strategy", "ddp", "--format", "json")
    assert out.returncode == 0, out.stderr
    data = json.loads(out.stdout)
    info = subprocess.run([sys.executable, "-m", "lmspec.runtime.cli", "info", "specs/gpt2.arch", "--seq", "256",
                           "--format", "json", *[f"--set={k}={v}" for k, v in SMALL_GPT.items()]],
                          cwd=ROOT, capture_output=True, text=True)
    info = json.loads(info.stdout)
    assert data["parameters"] == info["parameters"] == 4_273_664
    assert data["training_flops_per_token"] == info["training_flops_per_token"]
    assert data["seq"] == 256 and data["gpu_memory_bytes"] == 80e9
    assert [b["name"] for b in data["budgets"]] == ["chinchilla", "compute"]
    assert data["budgets"][1]["flops"] == pytest.approx(1e18)
    assert [(m["strategy"], m["activation_checkpointing"]) for m in data["memory_bytes_per_gpu"]] == \
        [("ddp", False), ("ddp", True)]
    assert all(m["fits"] == "yes" for m in data["memory_bytes_per_gpu"])


def test_plan_shows_the_rows_asked_for():
    out = plan_cli("specs/llama3.2-1b.arch", "--strategy", "fsdp", "--gpus", "4", "--activation-checkpointing",
                   "--gpu-memory", "24GiB", "--format", "json")
    rows = json.loads(out.stdout)["memory_bytes_per_gpu"]
    assert [(r["strategy"], r["activation_checkpointing"]) for r in rows] == [("fsdp", True)]
    out = plan_cli("specs/llama3.2-1b.arch", "--no-activation-checkpointing", "--format", "json")
    rows = json.loads(out.stdout)["memory_bytes_per_gpu"]
    assert [r["activation_checkpointing"] for r in rows] == [False, False]


@pytest.mark.parametrize("args, message", [
    (["--gpu-memory", "80"], "argument --gpu-memory: '80' is not a memory size: give a unit"),
    (["--gpus", "0"], "argument --gpus: must be an integer >= 1, got 0"),
    (["--tokens", "lots"], "argument --tokens: 'lots' is not a count"),
    (["--gpu-flops=-5T"], "argument --gpu-flops: '-5T' is not a FLOP count"),
    (["--mfu", "40"], "argument --mfu: must be a finite number > 0 and <= 1, got 40"),
    (["--seq", "9000"], "--seq 9000 is longer than the model's context 1024 (gpt2)"),
    (["--seq", "0"], "argument --seq: must be an integer >= 1, got 0"),
    (["--micro-batch", "0"], "argument --micro-batch: must be an integer >= 1, got 0"),
    (["--compute", "0"], "argument --compute: must be positive, got 0"),
])
def test_usage_errors_are_one_line(args, message):
    # the error, under a one-line usage where argparse refused the value
    out = plan_cli("specs/gpt2.arch", *args)
    assert out.returncode == 2
    assert out.stderr.splitlines()[:-1] in ([], ["usage: lmspec plan [options] spec   (see lmspec plan --help)"])
    assert out.stderr.strip().splitlines()[-1].startswith(f"lmspec plan: error: {message}"), out.stderr
    assert "Traceback" not in out.stderr


def test_tokens_and_compute_exclude_each_other():
    out = plan_cli("specs/gpt2.arch", "--tokens", "1B", "--compute", "1e20")
    assert out.returncode == 2 and "not allowed with argument" in out.stderr and "Traceback" not in out.stderr


def test_spec_errors_exit_1():
    out = plan_cli("tests/broken_specs/shape_mismatch.arch")
    assert out.returncode == 1 and "error:" in out.stderr and "Traceback" not in out.stderr
    out = plan_cli("specs/gpt2.arch", "--set", "heads=7")
    assert out.returncode == 1 and "Traceback" not in out.stderr


def test_plan_does_not_import_torch():
    code = ("import sys; from lmspec.runtime.cli import main; "
            "main(['plan', 'specs/llama3.1-70b.arch', '--gpus', '8', '--precision', 'bf16', '--tokens', '15T']); "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
