"""The lowered GPT-2 spec computes what a hand-written PyTorch GPT-2 computes, weight for weight."""
from pathlib import Path

import pytest
import torch

from gpt2_names import copy_into_reference
from lmspec.compiler import load_spec
from lmspec.compiler.lower import lower
from reference_gpt import GPT, GPTConfig

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("spec, gelu", [("gpt2.arch", "tanh"), ("tiny.arch", "none")])
def test_lowered_model_matches_hand_written_gpt(spec, gelu):
    sizes = dict(vocab=211, context=48, dim=96, heads=6, layers=3)
    graph = load_spec(str(ROOT / "specs" / spec), {**sizes, "dropout": 0.0})
    ours = lower(graph, seed=3).eval()
    reference = GPT(GPTConfig(**sizes, gelu_approximate=gelu)).eval()
    copy_into_reference(ours, reference)
    tokens = torch.randint(0, sizes["vocab"], (4, 48), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        diff = (ours(tokens) - reference(tokens)).abs().max().item()
    assert diff <= 1e-5


def test_gradients_match_hand_written_gpt():
    sizes = dict(vocab=101, context=32, dim=64, heads=4, layers=2)
    ours = lower(load_spec(str(ROOT / "specs" / "gpt2.arch"), {**sizes, "dropout": 0.0}), seed=5)
    reference = GPT(GPTConfig(**sizes, gelu_approximate="tanh"))
    copy_into_reference(ours, reference)
    tokens = torch.randint(0, 101, (2, 32))
    for m in (ours, reference):
        torch.nn.functional.cross_entropy(m(tokens[:, :-1]).flatten(0, 1), tokens[:, 1:].flatten()).backward()
    assert torch.allclose(ours.get_parameter("block.1.attn.qkv.weight").grad,
                          reference.transformer.h[1].attn.c_attn.weight.grad, atol=1e-6)
    assert torch.allclose(ours.wte.weight.grad, reference.transformer.wte.weight.grad, atol=1e-6)
