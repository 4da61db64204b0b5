"""Training under torchrun with DDP on CPU (gloo, 2 ranks): the same losses and weights as one
process with the same global batch, a 2-rank checkpoint resumed on 1 rank, and a killed rank
ending the job cleanly with the last checkpoint intact."""
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

from test_cli_train import SMALL, VERDICT, lmspec, losses

ROOT = Path(__file__).resolve().parents[2]
COMMON = ["specs/tiny.arch", *SMALL, "--data", str(VERDICT), "--warmup", "2", "--eval-every", "4",
          "--ckpt-every", "4", "--no-progress", "--sample-tokens", "0", "--threads", "1", "--set", "dropout=0.0"]


def torchrun(*args, ranks=2, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc-per-node={ranks}",
           "-m", "lmspec.runtime", *map(str, args)]
    return subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, **kw)


def weights(run: Path, step: int) -> dict:
    return load_file(str(run / "checkpoints" / f"step_{step:06d}" / "model.safetensors"))


@pytest.fixture(scope="module")
def two_ranks(tmp_path_factory):
    run = tmp_path_factory.mktemp("ddp") / "run"
    out = torchrun("train", *COMMON, "--steps", "8", "--batch", "2", "--grad-accum", "2", "--out", run)
    assert out.returncode == 0, out.stderr
    return run, out


def test_ddp_equals_one_process_with_the_global_batch(two_ranks, tmp_path):
    run, out = two_ranks
    assert out.stdout.count("done: step 8") == 1  # only rank 0 speaks
    one = tmp_path / "one"
    single = lmspec("train", *COMMON, "--steps", "8", "--batch", "4", "--grad-accum", "2", "--out", str(one))
    assert single.returncode == 0, single.stderr
    a, b = losses(run), losses(one)
    assert a.keys() == b.keys() == {4, 8}  # one metrics row per step: rank 1 wrote none
    assert all(abs(a[k] - b[k]) <= 1e-5 for k in a)
    wa, wb = weights(run, 8), weights(one, 8)
    assert all(torch.allclose(wa[k], wb[k], atol=1e-5) for k in wa)
    meta = json.loads((run / "checkpoints" / "step_000008" / "meta.json").read_text())
    assert meta["train_config"]["world_size"] == 2 and meta["metrics"]["tokens"] == 8 * 2 * 2 * 2 * 32


def test_a_two_rank_checkpoint_resumes_on_one_rank(two_ranks, tmp_path):
    import shutil
    run, _ = two_ranks
    copy = tmp_path / "copy"
    shutil.copytree(run, copy)
    (copy / "checkpoints" / "latest").write_text("step_000004\n")
    out = lmspec("train", *COMMON, "--out", str(copy), "--resume")
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
    from lmspec.runtime.checkpoint import load_checkpoint
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
