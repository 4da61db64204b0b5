"""The fixtures the runtime tests share across their stage folders (tests/runtime/<stage>/): the shared
data folder, tiny reference GPTs, a small trained run and its ONNX bundle. What the tests import by
name (paths, the command line, helpers) is in tests/runtime_helpers.py."""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from reference_gpt import GPT, GPTConfig  # tests/ is on pytest's pythonpath
from runtime_helpers import SHARED_DATA, lmspec_main


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


@pytest.fixture(scope="session")
def bpe(tmp_path_factory, verdict_text):
    """A small byte-level BPE (400 tokens) of the-verdict, with the default specials <|endoftext|>
    <|pad|> <|im_start|> <|im_end|> = 0..3 (so ChatML's tokens too)."""
    from lmspec.runtime.data.tokenizer_training import train_bpe
    return train_bpe(iter([verdict_text]), 400, tmp_path_factory.mktemp("bpe") / "tok.json")


TINY_BUNDLE_SETTINGS = ("--set", "layers=2", "--set", "dim=64", "--set", "heads=4", "--set", "context=64")


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, verdict_text) -> Path:
    """A small character-level model trained briefly on the-verdict.txt (so its output is text-like)."""
    run = tmp_path_factory.mktemp("tiny_run") / "run"
    out = lmspec_main("train", "specs/tiny.arch", *TINY_BUNDLE_SETTINGS, "--data", SHARED_DATA / "the-verdict.txt",
                      "--out", run, "--steps", "120", "--batch", "16", "--lr", "3e-3", "--warmup", "10",
                      "--eval-every", "60", "--eval-batches", "2", "--no-progress", "--sample-tokens", "0")
    assert out.returncode == 0, out.stderr
    return run


@pytest.fixture(scope="session")
def tiny_bundle(tmp_path_factory, tiny_run) -> Path:
    """`tiny_run` exported with `lmspec export`: the path of its .onnx file (tiny.lmspec.json beside it)."""
    path = tmp_path_factory.mktemp("tiny_bundle") / "tiny.onnx"
    assert lmspec_main("export", tiny_run, "-o", path).returncode == 0  # the CLI's own process: test_export.py
    return path


@pytest.fixture(scope="session")
def tiny_fused_bundle(tmp_path_factory, tiny_run) -> Path:
    """`tiny_run` exported with `lmspec export --fused-attention`: attention as onnxruntime's fused
    kernel over a shared KV buffer."""
    path = tmp_path_factory.mktemp("tiny_fused_bundle") / "tiny.onnx"
    out = lmspec_main("export", tiny_run, "-o", path, "--fused-attention")
    assert out.returncode == 0 and "parity fp32" in out.stdout, out.stderr
    return path
