"""The tests that need a CUDA GPU: every test in this folder is marked `gpu` and skipped where torch
sees no GPU, so the default run collects them and moves on in no time.

    python -m pytest -q tests/gpu -m gpu          # on a machine with a GPU (bench/gpu_check.sh runs it)

LMSPEC_GPU_TESTS_DEVICE=cpu runs the same tests on the CPU instead. That only checks the tests' own
plumbing on a machine without a GPU: the claims that exist only on a GPU (NCCL, the CUDA RNG state in
a checkpoint, the GPU peak table, TF32 tolerances) take their CPU form there.
"""
from __future__ import annotations

from pathlib import Path

import pytest

from .gpu_helpers import DEVICE, HERE, ON_GPU, QUIET, SMS, TINY, VERDICT, Run, lmspec, peak_tflops_args


def _no_gpu_reason() -> str | None:
    """Why the tests cannot run here, or None. torch is imported only once a test of this folder
    has been collected, and its CUDA probe neither fails nor initialises a context."""
    if DEVICE not in ("cuda", "cpu"):
        return f"LMSPEC_GPU_TESTS_DEVICE={DEVICE!r}: expected cuda or cpu"
    if not ON_GPU:
        return None
    import torch
    return None if torch.cuda.is_available() else "needs a CUDA GPU (torch.cuda.is_available() is False)"


@pytest.hookimpl(tryfirst=True)  # before `-m` selects by marker, so that `-m gpu` sees the mark
def pytest_collection_modifyitems(config, items):
    # a conftest's hook sees the whole session's items: mark only this folder's
    mine = [item for item in items if HERE in Path(str(item.path)).resolve().parents]
    if not mine:
        return
    reason = _no_gpu_reason()
    for item in mine:
        item.add_marker(pytest.mark.gpu)
        if reason:
            item.add_marker(pytest.mark.skip(reason=reason))


@pytest.fixture(scope="session")
def data_files():
    missing = [str(p) for p in (VERDICT, SMS) if not p.is_file()]
    if missing:
        pytest.skip(f"shared data not found: {', '.join(missing)}")


@pytest.fixture(scope="session")
def device_run(tmp_path_factory, data_files) -> Run:
    """tiny.arch trained 60 steps on the device, dropout on, evaluated and checkpointed every 20
    steps: the run the other tests resume, measure, sample, finetune and export."""
    path = tmp_path_factory.mktemp("device_run") / "run"
    peak = peak_tflops_args()
    out = lmspec("train", *TINY, "--set", "dropout=0.1", "--data", VERDICT, "--out", path, "--steps", "60",
                 "--batch", "16", "--lr", "3e-3", "--warmup", "5", "--eval-every", "20", "--eval-batches", "2",
                 "--ckpt-every", "20", "--device", DEVICE, *peak, *QUIET)
    assert out.returncode == 0, out.stderr
    return Run(path, out.stdout, peak)
