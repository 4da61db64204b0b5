"""Shared fixtures for the runtime tests: the shared data folder and tiny reference GPTs."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

TESTS_DIR = Path(__file__).resolve().parents[1]
# The shared data folder sits beside the repository: <repo>/../shared/data.
SHARED_DATA = TESTS_DIR.parent.parent / "shared" / "data"

from reference_gpt import GPT, GPTConfig  # noqa: E402  (tests/ is on pytest's pythonpath)


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
