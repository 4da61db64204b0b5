"""Shared fixtures for the runtime tests: the shared data folder and tiny reference GPTs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parents[1]
# The shared data folder sits beside the repository: <repo>/../shared/data.
SHARED_DATA = TESTS_DIR.parent.parent / "shared" / "data"

from reference_gpt import GPT, GPTConfig  # noqa: E402  (tests/ is on pytest's pythonpath)

SMS = SHARED_DATA / "SMSSpamCollection.tsv"
# tiny.arch cut down further: a base that trains and finetunes in seconds
TINY_BASE_SETTINGS = ("--set", "layers=2", "--set", "dim=32", "--set", "heads=2", "--set", "context=32")


def train_tiny_base(run: Path) -> Path:
    """A tiny character-level model, barely trained (3 steps on the-verdict): a base to finetune."""
    from lmspec.runtime.cli.main import main
    assert main(["train", "specs/tiny.arch", *TINY_BASE_SETTINGS, "--data", str(SHARED_DATA / "the-verdict.txt"),
                 "--steps", "3", "--no-progress", "--sample-tokens", "0", "--out", str(run)]) == 0
    return run


def finetune_spam(base: Path, out: Path, *extra: str, max_length: int = 24) -> int:
    """`lmspec finetune classify` on 48 balanced SMS texts, one epoch: its exit code."""
    from lmspec.runtime.cli.main import main
    return main(["finetune", "classify", str(base), "--data", str(SMS), "--labels", "ham,spam", "--balance",
                 "--limit", "48", "--epochs", "1", "--max-length", str(max_length), "--no-progress",
                 "--out", str(out), *extra])


@pytest.fixture(scope="session")
def shared_data() -> Path:
    return SHARED_DATA


@pytest.fixture(scope="session")
def verdict_text() -> str:
    path = SHARED_DATA / "the-verdict.txt"
    if not path.is_file():
        pytest.skip(f"shared data not found at {path}")
    return path.read_text(encoding="utf-8")


@pytest.fixture
def tiny_gpt():
    """make(vocab, init_seed=0, **overrides) -> a small reference GPT, initialised from init_seed."""

    def make(vocab: int, init_seed: int = 0, **overrides) -> GPT:
        settings = dict(vocab=vocab, context=32, dim=32, heads=2, layers=2, dropout=0.0)
        settings.update(overrides)
        torch.manual_seed(init_seed)
        return GPT(GPTConfig(**settings))

    return make


@pytest.fixture(autouse=True)
def one_torch_thread():
    """The models here are tiny: one thread is fastest, and it keeps the suite quick when the
    machine is busy (intra-op threads spin and oversubscribe a loaded 2-core machine badly)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def lmspec_cli(*args, cwd=None, env=None, timeout=600):
    """Run the real `lmspec` command line in a subprocess."""
    import subprocess
    import sys

    return subprocess.run([sys.executable, "-m", "lmspec.runtime.cli", *map(str, args)], cwd=cwd or TESTS_DIR.parent,
                          capture_output=True, text=True, env=env, timeout=timeout)


TINY_BUNDLE_SETTINGS = ("--set", "layers=2", "--set", "dim=64", "--set", "heads=4", "--set", "context=64")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, verdict_text) -> Path:
    """A small character-level model trained briefly on the-verdict.txt (so its output is text-like)."""
    run = tmp_path_factory.mktemp("tiny_run") / "run"
    out = lmspec_cli("train", "specs/tiny.arch", *TINY_BUNDLE_SETTINGS, "--data", SHARED_DATA / "the-verdict.txt",
                     "--out", run, "--steps", "120", "--batch", "16", "--lr", "3e-3", "--warmup", "10",
                     "--eval-every", "60", "--eval-batches", "2", "--no-progress", "--sample-tokens", "0")
    assert out.returncode == 0, out.stderr
    return run


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_run) -> Path:
    """`tiny_run` exported with `lmspec export`: the path of its .onnx file (tiny.lmspec.json beside it)."""
    path = tmp_path_factory.mktemp("tiny_bundle") / "tiny.onnx"
    out = lmspec_cli("export", tiny_run, "-o", path)
    assert out.returncode == 0, out.stderr
    return path
