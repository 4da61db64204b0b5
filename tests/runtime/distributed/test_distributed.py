"""Training under torchrun on CPU (gloo), with DDP, FSDP2, tensor and pipeline parallelism and
their compositions (a pp x dp x tp mesh): the same losses and weights as one process with the same
global batch, checkpoints resumed on 1 rank and under other layouts, and a killed rank ending the
job cleanly with the last checkpoint intact."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from runtime_helpers import SMALL, VERDICT, lmspec_main, losses

ROOT = Path(__file__).resolve().parents[3]
COMMON = ["specs/tiny.arch", *SMALL, "--data", str(VERDICT), "--warmup", "2", "--eval-every", "4",
          "--ckpt-every", "4", "--no-progress", "--sample-tokens", "0", "--threads", "1", "--set", "dropout=0.0"]


def torchrun(*args, ranks=2, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           "-m", "lmspec.runtime", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def val_losses(run: Path) -> dict[int, float]:
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    return {r["step"]: r["val_loss"] for r in rows if "val_loss" in r}


def close(a: dict, b: dict, tol: float = 1e-5) -> bool:
    return a.keys() == b.keys() and all(abs(a[k] - b[k]) <= tol for k in a)


def resumable_copy(run: Path, tmp_path: Path) -> Path:
    """A copy of a finished run whose `latest` points back at step 4, to resume from there."""
    import shutil
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "latest").write_text("step_000004\n")
    return copy


def optimizer_state(run: Path, step: int = 8) -> dict:
    """AdamW's state by `name.field`, read back from optimizer.safetensors or optimizer.dcp."""
    from lmspec.runtime.checkpoint.store import read_optimizer_by_name
    state = read_optimizer_by_name(run / "checkpoints" / f"step_{step:06d}")["state"]
    return {f"{n}.{k}": v for n, values in state.items() for k, v in values.items() if isinstance(v, torch.Tensor)}


def weights(run: Path, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


@pytest.fixture(scope="module")
def one_process(tmp_path_factory):
    """The reference: one process with the global batch of the 2-rank runs (2 ranks x 2)."""
    run = tmp_path_factory.mktemp("one") / "run"
    out = lmspec_main("train", *COMMON, "--steps", "8", "--batch", "4", "--grad-accum", "2", "--out", str(run))
    assert out.returncode == 0, out.stderr
    return run


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp") / "run"
    out = torchrun("train", *COMMON, "--steps", "8", "--batch", "2", "--grad-accum", "2", "--out", run)
    assert out.returncode == 0, out.stderr
    return run, out


def test_ddp_equals_one_process_with_the_global_batch(two_ranks, one_process):
    run, out = two_ranks
    one = one_process
    assert out.stdout.count("done: step 8") == 1  # only rank 0 speaks
    a, b = losses(run), losses(one)
    assert a.keys() == b.keys() == {4, 8}  # one metrics row per step: rank 1 wrote none
    assert close(a, b) and close(val_losses(run), val_losses(one))
    wa, wb = weights(run, 8), weights(one, 8)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    meta = json.loads((run / "checkpoints" / "step_000008" / "meta.json").read_text())
    assert meta["train_config"]["world_size"] == 2 and meta["metrics"]["tokens"] == 8 * 2 * 2 * 2 * 32


def test_a_two_rank_checkpoint_resumes_on_one_rank(two_ranks, tmp_path):
    run, _ = two_ranks
    copy = resumable_copy(run, tmp_path)
    out = lmspec_main("train", *COMMON, "--out", str(copy), "--resume")
    assert out.returncode == 0, out.stderr
    assert abs(losses(copy)[8] - losses(run)[8]) <= 1e-5
    wa, wb = weights(copy, 8), weights(run, 8)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def _children(pid: int) -> list[int]:
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                ppid = int((entry / "stat").read_text().rsplit(")", 1)[1].split()[1])
            except (OSError, IndexError, ValueError):
                continue
            if ppid == pid:
                found.append(int(entry.name))
    return found


@pytest.mark.skipif(not Path("/proc").is_dir(), reason="finds the rank processes through /proc")
def test_killing_a_rank_ends_the_job_and_keeps_the_last_checkpoint(tmp_path):
    from lmspec.runtime.checkpoint.store import load_checkpoint
    run = tmp_path / "run"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node=2", "-m",
           "lmspec.runtime", "train", *COMMON, "--steps", "100000", "--ckpt-every", "2", "--batch", "2",
           "--out", str(run)]
    job = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "LMSPEC_DIST_TIMEOUT": "30"})
    try:
        deadline = time.time() + 120
        while not (run / "checkpoints" / "latest").exists():
            assert job.poll() is None and time.time() < deadline, "no checkpoint was written"
            time.sleep(0.2)
        ranks = _children(job.pid)
        assert len(ranks) == 2, ranks
        os.kill(ranks[-1], signal.SIGKILL)
        started = time.time()
        _, stderr = job.communicate(timeout=120)  # no hang: torchrun stops the other rank
    finally:
        if job.poll() is None:
            job.kill()
    assert job.returncode != 0 and time.time() - started < 120
    load_checkpoint(run)  # the newest complete checkpoint still loads


@pytest.fixture(scope="module")
def fsdp_ranks(tmp_path_factory):
    run = tmp_path_factory.mktemp("fsdp") / "run"
    out = torchrun("train", *COMMON, "--strategy", "fsdp", "--steps", "8", "--batch", "2", "--grad-accum", "2",
                   "--out", run)
    assert out.returncode == 0, out.stderr
    return run, out


def test_fsdp_equals_one_process_with_the_global_batch(fsdp_ranks, one_process):
    run, out = fsdp_ranks
    assert "on 2 ranks (FSDP)" in out.stdout and out.stdout.count("done: step 8") == 1
    assert close(losses(run), losses(one_process)) and close(val_losses(run), val_losses(one_process))
    wa, wb = weights(run, 8), weights(one_process, 8)
    assert wa.keys() == wb.keys()  # consolidated: whole tensors, the tied head stored once, as one process does
    assert all(wa[k].shape == wb[k].shape and torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    shards = run / "checkpoints" / "step_000008" / "optimizer.dcp"
    assert sorted(p.name for p in shards.glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    assert not (shards.parent / "optimizer.safetensors").exists()
    assert not list((run / "checkpoints").glob(".tmp-*"))  # the staging directories were moved in


@pytest.mark.parametrize("ranks, strategy", [(1, None), pytest.param(2, "fsdp", marks=pytest.mark.slow)])
def test_an_fsdp_checkpoint_resumes_on_one_rank_and_on_two(fsdp_ranks, tmp_path, ranks, strategy):
    """On two ranks it resumes with --cpu-offload: the shards and AdamW state in host memory."""
    run, _ = fsdp_ranks
    copy = resumable_copy(run, tmp_path)
    args = ["train", *COMMON, "--out", str(copy), "--resume"]
    out = lmspec_main(*args) if ranks == 1 else torchrun(*args, "--cpu-offload")
    assert out.returncode == 0, out.stderr
    assert ranks == 1 or "on 2 ranks (FSDP, CPU offload)" in out.stdout
    assert close(losses(copy), losses(run)) and close(val_losses(copy), val_losses(run))
    wa, wb = weights(copy, 8), weights(run, 8)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


def test_a_one_process_checkpoint_resumes_sharded(one_process, tmp_path):
    copy = resumable_copy(one_process, tmp_path)
    out = torchrun("train", *COMMON, "--out", copy, "--resume", "--strategy", "fsdp")
    assert out.returncode == 0, out.stderr
    assert "(FSDP)" in out.stdout and close(losses(copy), losses(one_process))
    assert (copy / "checkpoints" / "step_000008" / "optimizer.dcp").is_dir()
    wa, wb = weights(copy, 8), weights(one_process, 8)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


@pytest.mark.parametrize("precision", ["bf16", pytest.param("fp16", marks=pytest.mark.slow)])
def test_fsdp_composes_with_mixed_precision_and_activation_checkpointing(fsdp_ranks, tmp_path, precision):
    run, _ = fsdp_ranks
    mixed = tmp_path / "mixed"
    out = torchrun("train", *COMMON, "--strategy", "fsdp", "--steps", "8", "--batch", "2", "--grad-accum", "2",
                   "--precision", precision, "--activation-checkpointing", "--out", mixed)
    assert out.returncode == 0, out.stderr
    # 16-bit matrix products follow the fp32 run closely, not exactly
    assert close(losses(mixed), losses(run), tol=0.05) and close(val_losses(mixed), val_losses(run), tol=0.05)
    wa, wb = weights(mixed, 8), weights(run, 8)
    assert all(wa[k].dtype == torch.float32 and torch.allclose(wa[k], wb[k], atol=5e-3) for k in wa)


def test_a_corrupt_optimizer_shard_is_a_located_error(fsdp_ranks, tmp_path):
    import shutil
    run, _ = fsdp_ranks
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    shard = copy / "checkpoints" / "step_000008" / "optimizer.dcp" / "__1_0.distcp"
    shard.write_bytes(shard.read_bytes()[:100])
    out = lmspec_main("train", *COMMON, "--steps", "12", "--out", str(copy), "--resume")
    assert out.returncode == 1 and "Traceback" not in out.stderr
    # the checksum meta.json records for rank 1's shard finds it before dcp reads it
    assert f"{shard}: checksum mismatch (the file is corrupt); step_000004 is intact" in out.stderr


# ---- tensor parallel (--tp): each layer split over the ranks, every rank on the same batch --------

@pytest.fixture(scope="module")
def tp_ranks(tmp_path_factory):
    run = tmp_path_factory.mktemp("tp") / "run"
    # with sequence parallelism: the residual stream, norms and position table split along the sequence
    out = torchrun("train", *COMMON, "--tp", "2", "--sequence-parallel", "--steps", "8", "--batch", "4",
                   "--grad-accum", "2", "--out", run)
    assert out.returncode == 0, out.stderr
    return run, out


def test_tensor_parallel_equals_one_process(tp_ranks, one_process):
    run, out = tp_ranks
    assert "on 2 ranks (TP 2)" in out.stdout and out.stdout.count("done: step 8") == 1
    assert close(losses(run), losses(one_process)) and close(val_losses(run), val_losses(one_process))
    wa, wb = weights(run, 8), weights(one_process, 8)
    assert wa.keys() == wb.keys()  # the single-process layout: whole, unpermuted, the tied head once
    assert all(wa[k].shape == wb[k].shape and torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    meta = json.loads((run / "checkpoints" / "step_000008" / "meta.json").read_text())
    assert meta["train_config"]["tensor_parallel"] == 2 and meta["train_config"]["world_size"] == 1


@pytest.mark.parametrize("ranks", [1, pytest.param(2, marks=pytest.mark.slow)])
def test_a_tensor_parallel_checkpoint_resumes_on_one_rank_and_on_two(tp_ranks, tmp_path, ranks):
    run, _ = tp_ranks
    copy = resumable_copy(run, tmp_path)
    args = ["train", *COMMON, "--out", str(copy), "--resume"]
    out = lmspec_main(*args) if ranks == 1 else torchrun(*args, "--tp", "2")
    assert out.returncode == 0, out.stderr
    assert close(losses(copy), losses(run)) and close(val_losses(copy), val_losses(run))
    wa, wb = weights(copy, 8), weights(run, 8)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


@pytest.mark.slow  # the message is checked in process (test_tensor_parallel, info --tp); this adds torchrun
def test_heads_that_do_not_split_are_refused_before_any_process_group(tmp_path):
    out = torchrun("train", *COMMON, "--set", "heads=1", "--tp", "2", "--steps", "2", "--out", tmp_path / "run",
                   env={**os.environ, "LMSPEC_DIST_TIMEOUT": "20"})
    assert out.returncode != 0
    assert out.stderr.count("1 heads do not divide over tensor-parallel size 2") == 1  # said once, by rank 0
    assert "specs/tiny.arch:10:" in out.stderr and not (tmp_path / "run").exists()
    assert "runtime/cli/train.py" not in out.stderr  # torchrun reports the failed ranks; no lmspec traceback
    wrong = lmspec_main("train", *COMMON, "--tp", "2", "--steps", "2", "--out", str(tmp_path / "run"))
    assert wrong.returncode == 2 and "--tp 2 splits each copy of the model over 2 ranks" in wrong.stderr


# ---- pipeline parallel (--pp): one stage per rank, every rank on the same batch ------------------

@pytest.fixture(scope="module")
def pp_ranks(tmp_path_factory):
    run = tmp_path_factory.mktemp("pp") / "run"
    out = torchrun("train", *COMMON, "--pp", "2", "--micro-batches", "2", "--steps", "8", "--batch", "4",
                   "--grad-accum", "2", "--out", run)
    assert out.returncode == 0, out.stderr
    return run, out


def test_pipeline_parallel_equals_one_process(pp_ranks, one_process):
    run, out = pp_ranks
    assert "on 2 ranks (PP 2)" in out.stdout and out.stdout.count("done: step 8") == 1
    assert close(losses(run), losses(one_process)) and close(val_losses(run), val_losses(one_process))
    wa, wb = weights(run, 8), weights(one_process, 8)
    assert wa.keys() == wb.keys()  # gathered from both stages, the head tied across them stored once
    assert all(wa[k].shape == wb[k].shape and torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    assert (run / "checkpoints" / "step_000008" / "optimizer.dcp").is_dir()  # each rank wrote its share
    oa, ob = optimizer_state(run), optimizer_state(one_process)
    assert oa.keys() == ob.keys() and all(torch.allclose(oa[k], ob[k], atol=1e-6) for k in oa)


@pytest.mark.slow  # test_tensor_and_pipeline_parallel_compose runs the composition; this adds bf16 and checkpointing
def test_tp_and_pp_compose_with_bf16_and_activation_checkpointing(pp_ranks, tmp_path):
    """TP 2 x PP 2: each stage, split over its tp ranks, runs its forward under autocast and
    recomputes its own blocks in the backward."""
    run, _ = pp_ranks
    mixed = tmp_path / "mixed"
    out = torchrun("train", *COMMON, "--tp", "2", "--pp", "2", "--micro-batches", "2", "--steps", "8", "--batch", "4",
                   "--grad-accum", "2", "--precision", "bf16", "--activation-checkpointing", "--out", mixed, ranks=4)
    assert out.returncode == 0, out.stderr
    # 16-bit matrix products follow the fp32 pipeline closely, not exactly
    assert close(losses(mixed), losses(run), tol=0.05) and not close(losses(mixed), losses(run), tol=1e-6)
    wa, wb = weights(mixed, 8), weights(run, 8)
    assert all(wa[k].dtype == torch.float32 and torch.allclose(wa[k], wb[k], atol=5e-3) for k in wa)
    fp16 = lmspec_main("train", *COMMON, "--pp", "2", "--precision", "fp16", "--steps", "2", "--out", str(tmp_path / "x"))
    assert fp16.returncode != 0 and "--pp does not combine with --precision fp16" in fp16.stderr


@pytest.mark.parametrize("source, layout", [pytest.param("pp", [], marks=pytest.mark.slow),
                                            ("tp", ["--pp", "2", "--micro-batches", "2"])],
                         ids=["pp-on-one-rank", "tp-on-two-pipeline-stages"])
def test_a_model_parallel_checkpoint_resumes_under_another_layout(pp_ranks, tp_ranks, tmp_path, source, layout):
    run = (pp_ranks if source == "pp" else tp_ranks)[0]
    copy = resumable_copy(run, tmp_path)
    args = ["train", *COMMON, "--out", str(copy), "--resume", *layout]
    out = torchrun(*args) if layout else lmspec_main(*args)
    assert out.returncode == 0, out.stderr
    assert close(losses(copy), losses(run)) and close(val_losses(copy), val_losses(run))
    wa, wb = weights(copy, 8), weights(run, 8)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)


# ---- composed layouts: a pp x dp x tp mesh (tp fastest) -------------------------------------------

@pytest.fixture(scope="module")
def tp_pp_ranks(tmp_path_factory):
    """4 ranks: 2 pipeline stages, each split over 2 tensor-parallel ranks (one replica)."""
    run = tmp_path_factory.mktemp("tppp") / "run"
    out = torchrun("train", *COMMON, "--tp", "2", "--pp", "2", "--micro-batches", "2", "--steps", "8",
                   "--batch", "4", "--grad-accum", "2", "--out", run, ranks=4)
    assert out.returncode == 0, out.stderr
    return run, out


def same_run(run: Path, reference: Path, optimizer: bool = False) -> None:
    assert close(losses(run), losses(reference)) and close(val_losses(run), val_losses(reference))
    wa, wb = weights(run, 8), weights(reference, 8)
    assert wa.keys() == wb.keys()
    assert all(wa[k].shape == wb[k].shape and torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    if optimizer:
        oa, ob = optimizer_state(run), optimizer_state(reference)
        assert oa.keys() == ob.keys() and all(torch.allclose(oa[k], ob[k], atol=1e-6) for k in oa)


def test_tensor_and_pipeline_parallel_compose(tp_pp_ranks, one_process):
    run, out = tp_pp_ranks
    assert "on 4 ranks (TP 2 x PP 2)" in out.stdout and out.stdout.count("done: step 8") == 1
    same_run(run, one_process, optimizer=True)  # the head tied across stages, split over tp on both


@pytest.mark.slow  # test_a_model_parallel_checkpoint_resumes_under_another_layout resumes across layouts
def test_fsdp_over_tensor_parallel_replicas_resumes_a_pipeline_checkpoint(tp_pp_ranks, one_process, tmp_path):
    """2-D FSDP x TP (fully_shard over the dp sub-mesh of DTensor shards), continuing the tp x pp run
    from its step-4 checkpoint: another layout, the same trajectory as one process."""
    copy = resumable_copy(tp_pp_ranks[0], tmp_path)
    out = torchrun("train", *COMMON, "--tp", "2", "--strategy", "fsdp", "--out", copy, "--resume", ranks=4)
    assert out.returncode == 0, out.stderr
    assert "on 4 ranks (FSDP 2 x TP 2)" in out.stdout
    same_run(copy, one_process, optimizer=True)


PP2 = ["--pp", "2", "--micro-batches", "2"]


@pytest.mark.slow
@pytest.mark.parametrize("layout, ranks", [(PP2, 4), (["--tp", "2"], 4), (["--tp", "2", *PP2], 8),
                                           (["--strategy", "fsdp", *PP2], 4),
                                           (["--strategy", "fsdp", "--tp", "2", *PP2], 8)],
                         ids=["ddp2-pp2", "ddp2-tp2", "ddp2-tp2-pp2", "fsdp2-pp2", "fsdp2-tp2-pp2"])
def test_data_parallel_replicas_of_model_parallel_groups(one_process, tmp_path, layout, ranks):
    """Then the step-4 checkpoint resumes on one process and continues identically."""
    run = tmp_path / "run"
    out = torchrun("train", *COMMON, *layout, "--steps", "8", "--batch", "2", "--grad-accum", "2", "--out", run,
                   ranks=ranks)
    assert out.returncode == 0, out.stderr
    assert ("(FSDP 2 x " if "fsdp" in layout else "(DDP 2 x ") in out.stdout
    same_run(run, one_process, optimizer=True)
    copy = resumable_copy(run, tmp_path)
    resumed = lmspec_main("train", *COMMON, "--out", str(copy), "--resume")
    assert resumed.returncode == 0, resumed.stderr
    same_run(copy, one_process, optimizer=True)


def test_a_world_that_does_not_hold_whole_model_parallel_groups_is_refused(tmp_path):
    out = lmspec_main("train", *COMMON, "--tp", "2", "--pp", "2", "--steps", "2", "--out", str(tmp_path / "run"))
    assert out.returncode == 2 and not (tmp_path / "run").exists()
    assert out.stderr.count("--tp 2 --pp 2 splits each copy of the model over 4 ranks: run a multiple of 4") == 1
