"""`lmspec train` on a GPU through the real command line: exact resume with dropout, the metrics a GPU
run logs (MFU, peak memory), one-GPU torchrun over NCCL, bf16 + torch.compile, and a GPU index that
is not there."""
from __future__ import annotations

import math
import re
import shutil

import pytest

from .gpu_helpers import DEVICE, ON_GPU, QUIET, TINY, VERDICT, lmspec, metrics, peak_tflops_args


def losses(rows: list[dict], key: str = "loss") -> dict[int, float]:
    return {r["step"]: r[key] for r in rows if key in r}


def test_a_resumed_run_continues_the_uninterrupted_one(device_run, tmp_path):
    """The run's step-20 checkpoint, as a 60-step run stopped there would have left it, resumed to
    step 60. A copy of the run rewound to step 20 stands for the stopped run: a run trained with
    --steps 20 would have had another learning-rate schedule, which follows --steps."""
    from safetensors.torch import load_file

    part = tmp_path / "part"
    shutil.copytree(device_run.path, part)
    for later in ("step_000040", "step_000060"):
        shutil.rmtree(part / "checkpoints" / later)
    (part / "checkpoints" / "latest").write_text("step_000020\n")
    rng = load_file(str(part / "checkpoints" / "step_000020" / "rng.safetensors"))
    # dropout draws from the device's generator: without its state the masks after step 20 would differ
    assert ("torch_cuda" in rng) == ON_GPU and {"torch_cpu", "batch_generator"} <= set(rng)

    out = lmspec("train", *TINY, "--data", VERDICT, "--out", part, "--resume", "--steps", "60", "--device", DEVICE,
                 *QUIET)
    assert out.returncode == 0, out.stderr
    assert "dropout masks differ" not in out.stderr
    whole, resumed = metrics(device_run.path), metrics(part)
    assert [r["step"] for r in resumed] == [r["step"] for r in whole] == list(range(10, 61, 10))
    assert resumed[:2] == whole[:2]  # up to the checkpoint: the lines it kept
    for key in ("loss", "val_loss"):
        a, b = losses(whole[2:], key), losses(resumed[2:], key)
        assert sorted(a) == sorted(b) and a
        if ON_GPU:
            # Same kernels, same inputs, same dropout masks, but not bit for bit: memory-efficient
            # attention's backward (what SDPA picks for fp32) accumulates with atomics, in an order
            # that varies from run to run. The differences stay at float rounding.
            assert all(b[s] == pytest.approx(a[s], rel=1e-5) for s in a), (a, b)
        else:
            assert b == a


def test_a_device_run_logs_mfu_peak_memory_and_gradient_norms(device_run):
    import torch
    from lmspec.compiler.analysis import parameter_count
    from lmspec.compiler.rewrites import graph_from_record
    from lmspec.runtime.checkpoint.store import load_checkpoint
    from lmspec.runtime.train.throughput import peak_flops, training_flops_per_token

    rows = metrics(device_run.path)
    ckpt = load_checkpoint(device_run.path)
    graph = graph_from_record(ckpt.spec)
    override = float(device_run.peak_args[1]) if device_run.peak_args else None
    peak = peak_flops(torch.device(DEVICE, 0) if ON_GPU else torch.device("cpu"), override)
    per_token = training_flops_per_token(graph, ckpt.train_config["seq"])
    for row in rows:
        assert row["peak_memory_bytes"] > 0 and row["tokens_per_s"] > 0
        assert row["grad_norm"] is not None and math.isfinite(row["grad_norm"]) and row["grad_norm"] > 0
        assert 0 < row["mfu"] < 1
        assert row["mfu"] == pytest.approx(row["tokens_per_s"] * per_token / peak, rel=1e-9)
    if ON_GPU:  # the allocator's high-water mark holds at least the fp32 weights, gradients and AdamW state
        assert min(r["peak_memory_bytes"] for r in rows) >= 4 * 4 * parameter_count(graph)
    val = losses(rows, "val_loss")
    assert sorted(val) == [20, 40, 60] and val[60] < val[20]

    out = device_run.stdout
    plan = re.search(r"^memory: lmspec plan predicts ([\d.]+) GB per (\w+) for this run", out, re.M)
    assert plan and plan.group(2) == DEVICE.upper(), out
    summary = re.search(r"^done: step 60, .*, MFU ([\d.]+)%\npeak memory ([\d.]+) GB on (.+) "
                        r"\(lmspec plan predicted ([\d.]+) GB\), \d+ s$", out, re.M)
    assert summary, out
    # a model this small uses a sliver of a GPU: its MFU may print as 0.0%
    assert 0 <= float(summary.group(1)) < 100 and float(summary.group(4)) == float(plan.group(1))
    if ON_GPU:
        assert summary.group(3) == f"{torch.cuda.get_device_name(0)} (cuda:0)"
        # one process, nothing after the last logged step: the summary's peak is the log's
        assert float(summary.group(2)) == pytest.approx(rows[-1]["peak_memory_bytes"] / 1e9, abs=0.006)


def test_torchrun_on_one_gpu_trains_over_nccl(data_files, tmp_path):
    run = tmp_path / "run"
    # --standalone: a free rendezvous port of its own rather than 29500, which another job may hold
    out = lmspec("train", *TINY, "--data", VERDICT, "--out", run, "--steps", "10", "--batch", "8",
                 "--eval-batches", "0", "--ckpt-every", "0", "--device", DEVICE, *QUIET,
                 module=("-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "1",
                         "-m", "lmspec.runtime"))
    assert out.returncode == 0, out.stderr
    backend = "nccl" if ON_GPU else "gloo"
    model_line = next(line for line in out.stdout.splitlines() if line.startswith("model "))
    assert f"on 1 rank over {backend}; device " in model_line
    if ON_GPU:
        assert model_line.endswith("(cuda:0)")
    assert [r["step"] for r in metrics(run)] == [10] and (run / "checkpoints" / "step_000010").is_dir()


def test_bf16_with_compile_learns_and_logs_mfu(data_files, tmp_path):
    run = tmp_path / "run"
    out = lmspec("train", *TINY, "--data", VERDICT, "--out", run, "--steps", "30", "--batch", "16", "--lr", "3e-3",
                 "--warmup", "5", "--eval-batches", "0", "--ckpt-every", "0", "--precision", "bf16", "--compile",
                 "--device", DEVICE, *peak_tflops_args(), *QUIET, timeout=600)
    assert out.returncode == 0, out.stderr
    rows = metrics(run)
    loss = losses(rows)
    # from ln(62) = 4.13 at initialisation (62 characters), down at every logged step
    assert sorted(loss) == [10, 20, 30] and 4.1 > loss[10] > loss[20] > loss[30], loss
    assert all(0 < r["mfu"] < 1 and math.isfinite(r["grad_norm"]) for r in rows)
    from lmspec.runtime.checkpoint.store import load_checkpoint
    config = load_checkpoint(run).train_config
    assert config["precision"] == "bf16" and config["compile"] is True


@pytest.mark.parametrize("verb", ["train", "sample", "eval"])
def test_a_gpu_index_past_the_last_is_one_line(verb, device_run, tmp_path):
    import torch
    count = torch.cuda.device_count() if ON_GPU else 0
    run = tmp_path / "run"
    args = {"train": ["train", *TINY, "--data", VERDICT, "--out", run, "--steps", "2", *QUIET],
            "sample": ["sample", device_run.path, "--max-tokens", "4"],
            "eval": ["eval", device_run.path, "--data", VERDICT, "--max-tokens", "100"]}[verb]
    out = lmspec(*args, "--device", f"cuda:{count}")
    assert out.returncode == 2 and out.stdout == ""
    assert out.stderr.startswith(f"lmspec {verb}: error: --device cuda:{count}: ") and out.stderr.count("\n") == 1
    assert "Traceback" not in out.stderr and not run.exists()
    if ON_GPU:
        assert f"this machine has {count} GPU" in out.stderr
