"""One run directory, one writer: a second trainer on a directory another live process is writing is
refused at once, naming that process; the lock of a killed process is taken over; the trainer that
holds it finishes with its metrics and checkpoints intact."""
from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time

import pytest
from runtime_helpers import ROOT, SMALL, VERDICT, losses

from lmspec.runtime.checkpoint.run_lock import LOCK_FILE, lock_holder, run_lock
from lmspec.runtime.checkpoint.store import load_checkpoint
from lmspec.runtime.errors import RunLockedError

HOLD = "import sys, time; from lmspec.runtime.checkpoint.run_lock import run_lock\n" \
       "with run_lock(sys.argv[1]):\n    print('held', flush=True); time.sleep(120)"


def _holding(run) -> subprocess.Popen:
    """A process that takes the run's lock and keeps it."""
    holder = subprocess.Popen([sys.executable, "-c", HOLD, str(run)], stdout=subprocess.PIPE, text=True)
    assert holder.stdout.readline().strip() == "held"
    return holder


def test_a_held_lock_refuses_and_names_its_holder_and_a_killed_holders_lock_is_taken_over(tmp_path):
    run = tmp_path / "run"
    holder = _holding(run)
    try:
        with pytest.raises(RunLockedError, match=rf"^{run} is being written by process {holder.pid} \(.*-c.*\), "
                                                 r"since .*; wait for it to finish, stop it, or choose another --out"):
            with run_lock(run):
                pass
        assert lock_holder(run)["pid"] == holder.pid
    finally:
        holder.send_signal(signal.SIGKILL)  # no clean-up of its own: the kernel frees its lock
        holder.wait()
    assert lock_holder(run) is None
    said = []
    with run_lock(run, say=said.append):
        assert lock_holder(run)["pid"] == os.getpid()
    assert len(said) == 1 and said[0].startswith(f"{run}: taking over the lock of process {holder.pid} (-c {run}), ")
    assert said[0].endswith(", which is no longer running")
    with run_lock(run, say=said.append):  # released cleanly: nothing to take over
        pass
    assert len(said) == 1


def test_a_directory_made_for_the_lock_goes_with_it_when_nothing_was_written(tmp_path):
    with pytest.raises(ValueError):
        with run_lock(tmp_path / "fresh"):
            raise ValueError("refused before the first file")
    assert not (tmp_path / "fresh").exists()
    with run_lock(tmp_path / "kept"):
        (tmp_path / "kept" / "metrics.jsonl").write_text("{}\n")
    assert sorted(p.name for p in (tmp_path / "kept").iterdir()) == [LOCK_FILE, "metrics.jsonl"]


def test_two_trainers_on_one_directory(tmp_path):
    run = tmp_path / "run"
    train = [sys.executable, "-m", "lmspec.runtime.cli", "train", "specs/tiny.arch", *SMALL, "--data", str(VERDICT),
             "--batch", "4", "--seq", "32", "--no-progress", "--sample-tokens", "0", "--out", str(run)]
    first = subprocess.Popen([*train, "--steps", "150", "--ckpt-every", "50", "--eval-every", "50"], cwd=ROOT,
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        deadline = time.monotonic() + 120
        while (lock_holder(run) or {}).get("pid") != first.pid:
            assert first.poll() is None and time.monotonic() < deadline, first.communicate()
            time.sleep(0.1)
        for extra in ([], ["--resume"]):  # a fresh run and a resumed one alike
            started = time.monotonic()
            second = subprocess.run([*train, "--steps", "10", *extra], cwd=ROOT, capture_output=True, text=True)
            assert second.returncode == 1 and second.stdout == ""
            assert second.stderr.strip().startswith(f"lmspec train: error: {run} is being written by process "
                                                    f"{first.pid} (")
            assert time.monotonic() - started < 60  # at once: before any data is read
        out, err = first.communicate(timeout=600)
    finally:
        first.kill()
    assert first.returncode == 0, err
    assert "done: step 150" in out
    rows = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows if "loss" in r] == sorted({r["step"] for r in rows if "loss" in r})
    assert max(losses(run)) == 150
    checkpoint = load_checkpoint(run)
    assert checkpoint.step == 150 and (run / "checkpoints" / "latest").read_text().strip() == "step_000150"
    assert lock_holder(run) is None
