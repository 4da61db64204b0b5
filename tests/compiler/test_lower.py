"""The lowered torch.fx module: names, initialisation, the KV cache, hand-written attention."""
from pathlib import Path

import pytest
import torch

from lmspec.compiler import load_spec
from lmspec.compiler.lower import lower
from lmspec.compiler.kv_cache import make_cache
from reference_build import built_on_the_cpu

ROOT = Path(__file__).resolve().parents[2]
SMALL = {"layers": 2, "dim": 64, "heads": 4, "vocab": 97, "context": 32}


def gpt2(**over):
    return load_spec(str(ROOT / "specs" / "gpt2.arch"), {**SMALL, **over})


def test_module_parameters_are_the_graph_parameters():
    g = gpt2()
    m = lower(g)
    assert set(m.state_dict()) == set(g.params)
    for name, p in g.params.items():
        assert tuple(m.get_parameter(name).shape) == p.shape
    assert m.lm_head.weight is m.wte.weight  # tied, one storage
    owned = sum(p.numel() for p in m.parameters())
    from lmspec.compiler.analysis import parameter_count
    assert owned == parameter_count(g)


def test_generated_code_is_readable_python():
    code = lower(gpt2()).code
    assert "def forward(self, tokens, cache = None):" in code
    assert 'getattr(self.block, "1").attn(' in code


def test_gpt2_initialisation():
    g = gpt2(layers=6, dim=256, heads=4, vocab=2000)
    m = lower(g, seed=0)
    assert m.wte.weight.std().item() == pytest.approx(0.02, rel=0.05)
    residual_std = 0.02 / (2 * 6) ** 0.5
    proj = m.get_parameter("block.3.mlp.proj.weight")
    assert proj.std().item() == pytest.approx(residual_std, rel=0.05)
    assert m.get_parameter("block.3.attn.qkv.bias").abs().max().item() == 0
    assert torch.all(m.get_parameter("block.3.ln.weight") == 1)
    again = lower(g, seed=0)
    assert torch.equal(again.get_parameter("block.5.attn.qkv.weight"), m.get_parameter("block.5.attn.qkv.weight"))


@pytest.mark.parametrize("spec, overrides", [
    ("gpt2.arch", SMALL),
    ("llama3.2-1b.arch", {"layers": 2, "dim": 64, "heads": 4, "kv_heads": 2, "head_dim": 16, "ffn": 96, "vocab": 101}),
    ("qwen3-moe-tiny.arch", {}),
])
def test_the_meta_build_gives_the_weights_of_the_cpu_build(spec, overrides):
    from lmspec.compiler.lora import add_lora
    from lmspec.compiler.lower import build

    graph = load_spec(str(ROOT / "specs" / spec), overrides)
    for g in (graph, add_lora(graph, rank=4, alpha=8.0, targets=["attn.qkv", "mlp.*"])):
        reference, model = built_on_the_cpu(g, seed=11), lower(g, seed=11)
        assert reference.state_dict().keys() == model.state_dict().keys()
        for name, value in reference.state_dict().items():  # buffers (rotary frequencies) too
            assert torch.equal(model.state_dict()[name], value), name
        tied = [n for n, p in g.params.items() if p.tied_to]
        assert all(model.get_parameter(n) is model.get_parameter(g.params[n].tied_to) for n in tied)
        tokens = torch.randint(0, 90, (2, 12))
        assert torch.equal(model.eval()(tokens), reference.eval()(tokens))
    assert all(p.is_meta for p in build(graph).parameters())


def test_kv_cache_gives_the_same_logits_as_a_full_forward():
    m = lower(gpt2()).eval()
    tokens = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        full = m(tokens)
        cache = make_cache(m, 32)
        parts = []
        for a, b in [(0, 7), (7, 12), (12, 13), (13, 20)]:
            parts.append(m(tokens[:, a:b], cache))
            cache.advance(b - a)
    assert torch.allclose(torch.cat(parts, 1), full, atol=1e-5)


def test_hand_written_attention_equals_the_fused_op(tmp_path):
    """The same model with attention written from matmul/softmax/causal_mask and with the op."""
    body = """
model m {
  vocab = 50; context = 16; dim = 32; heads = 4; layers = 2
  input tokens: i64[batch, seq <= context]
  x = embedding(tokens, vocab, dim) as wte + position(seq, context, dim) as wpe
  repeat layers as block {
    x = x + ATTN
    x = x + mlp(layernorm(x), 4 * dim)
  }
  logits = linear(layernorm(x) as ln_f, vocab, bias=false, tie=wte) as lm_head
  output logits: f32[batch, seq, vocab]
}
"""
    fused = tmp_path / "fused.arch"
    fused.write_text(body.replace("ATTN", "attention(layernorm(x), heads)"))
    hand = tmp_path / "hand.arch"
    hand.write_text(f'use "{ROOT}/specs/blocks/attention.arch"\n' +
                    body.replace("ATTN", "causal_self_attention(layernorm(x), heads) as attn"))
    a, b = lower(load_spec(str(fused)), seed=1).eval(), lower(load_spec(str(hand)), seed=2).eval()
    assert set(a.state_dict()) == set(b.state_dict())
    b.load_state_dict(a.state_dict())
    tokens = torch.randint(0, 50, (2, 16))
    with torch.no_grad():
        assert torch.allclose(a(tokens), b(tokens), atol=1e-5)
    assert a.supports_kv_cache and not b.supports_kv_cache


def test_dropout_is_active_only_in_training():
    m = lower(gpt2(dropout=0.5))
    tokens = torch.randint(0, 97, (2, 8))
    m.train()
    assert not torch.equal(m(tokens), m(tokens))
    m.eval()
    assert torch.equal(m(tokens), m(tokens))


@pytest.mark.slow
def test_torch_compile_runs_the_lowered_module():
    m = lower(gpt2()).eval()
    tokens = torch.randint(0, 97, (2, 8))
    compiled = torch.compile(m)
    with torch.no_grad():
        assert torch.allclose(compiled(tokens), m(tokens), atol=1e-5)
