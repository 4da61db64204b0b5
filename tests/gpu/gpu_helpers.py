"""What the tests in tests/gpu share: the real command line, the tiny model they train, where the
shared data is, and which device they run on (see conftest.py)."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from dataclasses import dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parents[1]
DATA = ROOT.parent / "shared" / "data"
VERDICT = DATA / "the-verdict.txt"
SMS = DATA / "SMSSpamCollection.tsv"
DEVICE = os.environ.get("LMSPEC_GPU_TESTS_DEVICE", "cuda")
ON_GPU = DEVICE == "cuda"
# tiny.arch cut down: trains in a second on a GPU, and still learns the-verdict's characters
TINY = ("specs/tiny.arch", "--set", "layers=2", "--set", "dim=64", "--set", "heads=4", "--set", "context=64")
QUIET = ("--no-progress", "--sample-tokens", "0")


def lmspec(*args, timeout: float = 300, module: tuple[str, ...] = ("-m", "lmspec.runtime.cli")
           ) -> subprocess.CompletedProcess:
    """The real command line, in a process of its own (a fresh CUDA context each time)."""
    return subprocess.run([sys.executable, *module, *map(str, args)], cwd=ROOT, capture_output=True, text=True,
                          timeout=timeout)


def metrics(run: Path) -> list[dict]:
    return [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]


def peak_tflops_args() -> list[str]:
    """--peak-tflops where the run's device has no entry in lmspec's peak table (the CPU, or a GPU
    it does not know), so that every run here logs MFU; nothing for a GPU the table knows."""
    if not ON_GPU:
        return ["--peak-tflops", "1"]
    import torch
    from lmspec.runtime.train.throughput import PEAK_BF16_TFLOPS
    name = torch.cuda.get_device_name(0)
    return [] if any(key in name for key in PEAK_BF16_TFLOPS) else ["--peak-tflops", "100"]


@dataclass
class Run:
    path: Path
    stdout: str
    peak_args: list[str]
