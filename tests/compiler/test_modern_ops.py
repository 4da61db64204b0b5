"""The ops of modern architectures: rotary positions (partial, Llama-3 scaling), grouped-query
heads of their own width, QK-norm, sliding windows, soft-capping, GLU feed-forwards, offset
RMSNorm and mixtures of experts; checked against direct computations, the KV cache and the
checker's errors. Parity with `transformers` itself is in tests/runtime/hf/test_hf.py."""
import math

import pytest
import torch

from lmspec.compiler import load_spec
from lmspec.compiler.lower import lower
from lmspec.compiler.kv_cache import KVCache, make_cache
from lmspec.compiler.torch_modules import rope_frequencies
from lmspec.runtime.train.sampling import generate
from lmspec.dsl.diagnostics import SpecError

TINY = dict(vocab=97, context=64, dim=32, layers=2, heads=4, kv_heads=2, head_dim=16)


def tiny(spec, **extra):
    return lower(load_spec(f"specs/{spec}.arch", {**TINY, **extra}), seed=0).eval()


def write_spec(tmp_path, body, name="m"):
    path = tmp_path / f"{name}.arch"
    path.write_text(f"model {name} {{\n  input tokens: i64[batch, seq <= 64]\n{body}\n}}\n")
    return str(path)


def test_llama3_frequency_scaling_follows_the_published_rule():
    plain = rope_frequencies(64, 500000.0)
    scaled = rope_frequencies(64, 500000.0, "llama3", factor=8.0, low=1.0, high=4.0, original_context=8192)
    wavelen = 2 * math.pi / plain
    high = wavelen < 8192 / 4  # short wavelengths are kept
    low = wavelen > 8192 / 1  # long ones are divided by the factor
    assert torch.equal(scaled[high], plain[high])
    assert torch.allclose(scaled[low], plain[low] / 8.0)
    middle = ~high & ~low
    assert middle.any() and bool(((scaled[middle] < plain[middle]) & (scaled[middle] > plain[middle] / 8)).all())
    assert torch.allclose(rope_frequencies(64, 10000.0, "linear", factor=4.0), rope_frequencies(64, 10000.0) / 4)


@pytest.mark.parametrize("spec, extra", [
    ("llama3.2-1b", dict(ffn=64, rope_original=16)),
    ("mistral-7b", dict(ffn=64, window=5)),
    ("qwen3-0.6b", dict(ffn=64)),
    ("qwen3-moe-tiny", dict(experts=4, top_k=2, moe_ffn=16)),
])
def test_kv_cache_decoding_equals_full_forwards(spec, extra):
    model = tiny(spec, **extra)
    ids = torch.randint(0, 97, (2, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        torch.testing.assert_close(decoded_with_cache(model, ids, 7), model(ids), atol=1e-5, rtol=1e-5)


def decoded_with_cache(model, ids: torch.Tensor, prompt: int, cache: KVCache | None = None) -> torch.Tensor:
    """The logits of `ids` from the KV cache: the first `prompt` tokens at once, then one at a time."""
    cache = cache or KVCache(ids.shape[1])
    steps = [model(ids[:, :prompt], cache)]
    cache.advance(prompt)
    for t in range(prompt, ids.shape[1]):
        steps.append(model(ids[:, t:t + 1], cache))
        cache.advance(1)
    return torch.cat(steps, dim=1)


def test_a_sliding_window_layers_cache_holds_a_bounded_number_of_positions():
    """Mistral's window of 4 on every layer, 54 tokens decoded one by one after a prompt of 6: each
    layer keeps at most 2 x (3 past keys + the 6 new ones) positions, the logits those of a full forward."""
    model = tiny("mistral-7b", ffn=64, window=4)
    ids = torch.randint(0, 97, (2, 60), generator=torch.Generator().manual_seed(2))
    cache = make_cache(model, ids.shape[1])
    assert cache.kept == {layer: 3 for layer in range(2)}
    with torch.no_grad():
        torch.testing.assert_close(decoded_with_cache(model, ids, 6, cache), model(ids), atol=1e-5, rtol=1e-5)
    assert cache.offset == 60 and all(keys.shape[2] <= 18 for keys in cache._keys.values())
    assert all(start >= 60 - 18 for start in cache._start.values())  # the early keys are gone
    unbounded = make_cache(tiny("llama3.2-1b", ffn=64, rope_original=16), 60)
    assert unbounded.kept == {}
    # `lmspec sample`'s loop (which makes such a cache) continues as full forwards would
    prompt, seq = ids[0, :6].tolist(), ids[0, :6].tolist()
    with torch.no_grad():
        for _ in range(40):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))
    assert generate(model, prompt, 40, temperature=0) == seq[6:]


def test_sliding_window_hides_keys_older_than_the_window():
    model = tiny("mistral-7b", ffn=64, window=4, layers=1)
    a = torch.randint(0, 97, (1, 12), generator=torch.Generator().manual_seed(1))
    b = a.clone()
    b[0, :4] = (b[0, :4] + 1) % 97  # only positions 0-3 differ
    with torch.no_grad():
        la, lb = model(a), model(b)
    # With one layer, position t sees t-3..t: from position 7 on, the changed tokens are out of view.
    assert not torch.allclose(la[0, 6], lb[0, 6])
    torch.testing.assert_close(la[0, 7:], lb[0, 7:])


def test_partial_rotary_attention_depends_only_on_relative_positions(tmp_path):
    spec = write_spec(tmp_path, """
  x = embedding(tokens, 50, 32) as embed
  y = attention(x, 4, head_dim=8, rope=true, rotary_dim=4, bias=false, causal=false)
  output y""")
    model = lower(load_spec(spec), seed=0).eval()
    ids = torch.randint(0, 50, (1, 6), generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        # Rotary positions depend only on distances: shifting every position by 5 changes nothing.
        class Shifted:  # a cache that stores nothing and gives explicit positions
            offset = 0
            position_ids = torch.arange(5, 11)[None]

            def update(self, layer, k, v):
                return k, v
        torch.testing.assert_close(model(ids, Shifted()), model(ids), atol=1e-5, rtol=1e-5)


def test_qk_norm_softcap_scale_and_offset_norm_lower_to_their_formulas(tmp_path):
    spec = write_spec(tmp_path, """
  x = embedding(tokens, 50, 16) as embed
  y = attention(x, 2, qk_norm=true, softcap=5.0, scale=0.5, bias=false) as attn
  z = softcap(rmsnorm(y, offset=1.0) as norm, 3.0)
  output z""")
    model = lower(load_spec(spec), seed=0).eval()
    assert torch.equal(model.norm.weight, torch.zeros(16))  # 1 + w starts as the identity
    assert set(dict(model.named_parameters())) == {"embed.weight", "attn.qkv.weight", "attn.proj.weight",
                                                   "attn.q_norm.weight", "attn.k_norm.weight", "norm.weight"}
    with torch.no_grad():
        model.norm.weight.normal_()
        model.attn.q_norm.weight.normal_()
        ids = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(3))
        x = model.embed(ids)
        q, k, v = model.attn.qkv(x).split(16, dim=-1)
        heads = lambda t: t.view(1, 5, 2, 8)
        rms = lambda t, w: t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * w
        q = rms(heads(q), model.attn.q_norm.weight).transpose(1, 2)
        k = rms(heads(k), model.attn.k_norm.weight).transpose(1, 2)
        scores = 5.0 * torch.tanh((q @ k.transpose(-1, -2)) * 0.5 / 5.0)
        scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
        y = model.attn.proj((scores.softmax(-1) @ heads(v).transpose(1, 2)).transpose(1, 2).reshape(1, 5, 16))
        want = 3.0 * torch.tanh(rms(y, 1.0 + model.norm.weight) / 3.0)
        torch.testing.assert_close(model(ids), want, atol=1e-5, rtol=1e-5)


def test_gated_mlp_is_proj_of_act_gate_times_up(tmp_path):
    spec = write_spec(tmp_path, """
  x = embedding(tokens, 50, 16) as embed
  y = mlp(x, 24, act=gelu_tanh, gated=true, bias=false) as mlp
  output y""")
    model = lower(load_spec(spec), seed=0).eval()
    assert model.mlp.fc.weight.shape == (48, 16) and model.mlp.proj.weight.shape == (16, 24)
    ids = torch.tensor([[1, 2, 3]])
    with torch.no_grad():
        x = model.embed(ids)
        gate, up = x @ model.mlp.fc.weight[:24].T, x @ model.mlp.fc.weight[24:].T
        want = (torch.nn.functional.gelu(gate, approximate="tanh") * up) @ model.mlp.proj.weight.T
        torch.testing.assert_close(model(ids), want)


def test_moe_routes_each_token_to_its_top_k_experts_and_its_traced_form_agrees():
    model = tiny("qwen3-moe-tiny", experts=4, top_k=2, moe_ffn=16, layers=1)
    moe = model.get_submodule("block.0.mlp")
    x = torch.randn(3, 5, 32, generator=torch.Generator().manual_seed(4))
    with torch.no_grad():
        got = moe(x)
        flat = x.reshape(-1, 32)
        probs = torch.softmax(flat @ moe.router.weight.T, dim=-1)
        want = torch.zeros_like(flat)
        for n in range(flat.shape[0]):
            w, chosen = probs[n].topk(2)
            for weight, e in zip(w / w.sum(), chosen.tolist()):
                gate, up = (flat[n] @ moe.fc_weight[e].T).chunk(2)
                want[n] += weight * ((torch.nn.functional.silu(gate) * up) @ moe.proj_weight[e].T)
        torch.testing.assert_close(got, want.reshape(3, 5, 32), atol=1e-5, rtol=1e-5)
        compiled = torch.compile(moe, backend="eager", fullgraph=True)  # the dense, traceable path
        torch.testing.assert_close(compiled(x), got, atol=1e-5, rtol=1e-5)


def test_moe_flops_count_only_the_active_experts():
    from lmspec.compiler.analysis import flops_per_token
    dense = flops_per_token(load_spec("specs/qwen3-30b-a3b.arch"), seq=1)
    # Per layer: router 2*d*E + top_k experts of 3 matrices 2*d*h; attention projections; head.
    d, layers, experts, h = 2048, 48, 128, 768
    attention = 2 * d * (32 + 2 * 4) * 128 + 2 * 32 * 128 * d + 2 * 2 * 32 * 128
    want = layers * (2 * d * experts + 8 * 3 * 2 * d * h + attention) + 2 * d * 151936
    assert dense == want


def test_kv_cache_grows_instead_of_reserving_the_context():
    cache = KVCache(max_len=100_000)
    k = torch.ones(1, 2, 3, 4)
    cache.update(0, k, k)
    cache.advance(3)
    assert cache._keys[0].shape[2] == 64
    for _ in range(30):
        cache.update(0, k, 2 * k)
        cache.advance(3)
    assert cache._keys[0].shape[2] == 128 and cache.offset == 93
    keys, values = cache.update(0, k, k)
    assert keys.shape[2] == 96 and torch.equal(values[:, :, 3:6], 2 * k)


@pytest.mark.parametrize("call, message, arg", [
    ("attention(x, 4, rope=true, rotary_dim=3)", "rotary_dim must be even", "rotary_dim=3"),
    ('attention(x, 4, rope=true, rope_scaling="yarn")', "rope_scaling must be one of", 'rope_scaling="yarn"'),
    ('attention(x, 4, rope=true, rope_scaling="llama3")', "needs rope_original", "attention("),
    # before: accepted, and the frequencies divided by it were infinite (--set rope_factor=0 on a Llama spec)
    ('attention(x, 4, rope=true, rope_scaling="linear", rope_factor=0.0)', "rope_factor must be positive",
     "rope_factor=0.0"),
    ('attention(x, 4, rope=true, rope_scaling="llama3", rope_original=-8)', "rope_original must be positive",
     "rope_original=-8"),
    ("attention(x, 4, window=0)", "window must be positive", "window=0"),
    ("attention(x, 3)", "not divisible by 3 heads (or give head_dim)", "3"),
    ("attention(x, 4, kv_heads=3)", "not divisible into 3 kv_heads", "kv_heads=3"),
    ("moe(x, 4, 5, 16)", "top_k 5 is more than the 4 experts", "5"),
    ("mlp(x, 16, gated=1)", "gated", "gated=1"),
    ("softcap(x, 0.0)", "cap must be positive", "0.0"),
])
def test_misused_options_are_located_errors(tmp_path, call, message, arg):
    spec = write_spec(tmp_path, f"  x = embedding(tokens, 50, 32)\n  y = {call}\n  output y")
    with pytest.raises(SpecError) as err:
        load_spec(spec)
    text = err.value.render()
    assert message in text, text
    line = next(line for line in text.splitlines() if line.lstrip().startswith("4 |"))
    caret = text.splitlines()[text.splitlines().index(line) + 1]
    assert line[caret.index("^"):].startswith(arg), text


def test_a_layernorm_without_parameters_and_qk_norm_by_one_plus_weight(tmp_path):
    """OLMo's LayerNorm learns nothing; Gemma 3's QK-norm scales by 1 + w (stored as w, starting at 0)."""
    spec = write_spec(tmp_path, """
  x = embedding(tokens, 50, 16) as embed
  y = attention(layernorm(x, affine=false) as ln, 2, qk_norm=true, qk_norm_offset=1.0, bias=false) as attn
  output y""")
    graph = load_spec(spec)
    model = lower(graph, seed=0).eval()
    assert set(dict(model.named_parameters())) == {"embed.weight", "attn.qkv.weight", "attn.proj.weight",
                                                   "attn.q_norm.weight", "attn.k_norm.weight"}
    assert torch.equal(model.attn.q_norm.weight, torch.zeros(8))  # 1 + w starts as the identity
    with torch.no_grad():
        model.attn.q_norm.weight.normal_()
        ids = torch.randint(0, 50, (1, 5), generator=torch.Generator().manual_seed(3))
        x = torch.nn.functional.layer_norm(model.embed(ids), (16,))
        q, k, v = model.attn.qkv(x).split(16, dim=-1)
        heads = lambda t: t.view(1, 5, 2, 8)
        rms = lambda t, w: t / torch.sqrt(t.pow(2).mean(-1, keepdim=True) + 1e-6) * (1.0 + w)
        q = rms(heads(q), model.attn.q_norm.weight).transpose(1, 2)
        k = rms(heads(k), model.attn.k_norm.weight).transpose(1, 2)
        scores = (q @ k.transpose(-1, -2)) / math.sqrt(8)
        scores = scores.masked_fill(~torch.ones(5, 5, dtype=torch.bool).tril(), float("-inf"))
        want = model.attn.proj((scores.softmax(-1) @ heads(v).transpose(1, 2)).transpose(1, 2).reshape(1, 5, 16))
        torch.testing.assert_close(model(ids), want, atol=1e-5, rtol=1e-5)
