import pytest
import torch
import torch.nn.functional as F
from torch import nn

from lmspec.compiler.kv_cache import KVCache
from lmspec.runtime.train.sampling import encode_prompt, generate
from lmspec.runtime.data.tokenizer import CharTokenizer
from reference_gpt import GPT

VOCAB = 24
CONTEXT = 16


class CachedGPT(GPT):
    """The reference GPT with its attention reading and writing the runtime's KVCache, the way
    lowered specs do; it counts the tokens each forward is given, to show the cache is used."""

    supports_kv_cache = True

    def __init__(self, config):
        super().__init__(config)
        self.forward_lengths: list[int] = []

    def forward(self, tokens, cache=None):
        self.forward_lengths.append(tokens.shape[1])
        if cache is None:
            return super().forward(tokens)
        offset, t = cache.offset, tokens.shape[1]
        pos = torch.arange(offset, offset + t)
        x = self.transformer.wte(tokens) + self.transformer.wpe(pos)
        for layer, block in enumerate(self.transformer.h):
            x = x + self._attention(block.attn, block.ln_1(x), cache, layer, offset)
            x = x + block.mlp(block.ln_2(x))
        return self.lm_head(self.transformer.ln_f(x))

    def _attention(self, attn, x, cache: KVCache, layer: int, offset: int):
        b, t, c = x.shape
        heads = attn.heads
        q, k, v = (z.view(b, t, heads, c // heads).transpose(1, 2) for z in attn.c_attn(x).split(c, dim=2))
        k, v = cache.update(layer, k, v)
        mask = torch.ones(t, k.shape[2], dtype=torch.bool).tril(diagonal=offset)
        y = F.scaled_dot_product_attention(q, k, v, attn_mask=mask)
        return attn.c_proj(y.transpose(1, 2).reshape(b, t, c))


@pytest.fixture
def models(tiny_gpt):
    """A plain reference GPT and a cache-using copy with the same weights."""
    plain = tiny_gpt(VOCAB, context=CONTEXT, init_seed=5)
    with torch.no_grad():  # larger logits than at init, so greedy choices are not near-ties
        for p in plain.parameters():
            p.mul_(4.0)
    cached = CachedGPT(plain.config)
    cached.load_state_dict(plain.state_dict())
    return plain, cached


PROMPT = [3, 1, 4, 1, 5, 9, 2, 6]


def test_greedy_with_cache_equals_greedy_without(models):
    plain, cached = models
    expected = generate(plain, PROMPT, 6, temperature=0)
    assert generate(cached, PROMPT, 6, temperature=0) == expected
    assert cached.forward_lengths == [len(PROMPT)] + [1] * 5  # prompt once, then one token per step


def test_generation_past_the_context_slides_the_window(models):
    plain, cached = models
    expected = generate(plain, PROMPT, 30, temperature=0)  # 8 + 30 tokens > context 16
    assert len(expected) == 30
    assert generate(cached, PROMPT, 30, temperature=0) == expected
    # The cache fills at 16 positions; after that every step re-runs a full window (never more:
    # the reference GPT raises on a sequence longer than its context).
    assert cached.forward_lengths == [8] + [1] * 8 + [CONTEXT] * 21


def test_prompt_longer_than_the_context(models):
    plain, cached = models
    prompt = list(range(VOCAB)) * 2  # 48 tokens; only the last 16 can be seen
    assert generate(cached, prompt, 5, temperature=0) == generate(plain, prompt, 5, temperature=0)
    assert generate(plain, prompt, 5, temperature=0) == generate(plain, prompt[-CONTEXT:], 5, temperature=0)


def test_greedy_continues_with_the_most_likely_token(models):
    plain, _ = models
    with torch.no_grad():
        first = int(plain(torch.tensor([PROMPT]))[0, -1].argmax())
    assert generate(plain, PROMPT, 1, temperature=0) == [first]


def test_sampling_is_reproducible_with_a_seed(models):
    _, cached = models
    a = generate(cached, PROMPT, 20, temperature=1.0, seed=1)
    assert generate(cached, PROMPT, 20, temperature=1.0, seed=1) == a
    assert generate(cached, PROMPT, 20, temperature=1.0, seed=2) != a


def test_top_k_one_and_tiny_top_p_are_greedy(models):
    plain, cached = models
    greedy = generate(plain, PROMPT, 12, temperature=0)
    assert generate(cached, PROMPT, 12, temperature=1.0, top_k=1, seed=3) == greedy
    assert generate(cached, PROMPT, 12, temperature=1.5, top_p=1e-6, seed=3) == greedy


def test_stops_at_end_of_text(models):
    plain, _ = models
    greedy = generate(plain, PROMPT, 10, temperature=0)
    eot = greedy[3]
    stop = greedy.index(eot)
    assert generate(plain, PROMPT, 10, temperature=0, eot_id=eot) == greedy[:stop + 1]


def test_model_mode_is_restored(models):
    plain, _ = models
    plain.train()
    generate(plain, PROMPT, 2)
    assert plain.training


class FixedLogits(nn.Module):
    """Every position scores the vocabulary the same way: probabilities 0.5, 0.3, 0.15, 0.05."""

    context = 4

    def __init__(self):
        super().__init__()
        self.logits = nn.Parameter(torch.tensor([0.5, 0.3, 0.15, 0.05]).log())

    def forward(self, tokens, cache=None):
        return self.logits.expand(tokens.shape[0], tokens.shape[1], 4)


def test_top_k_and_top_p_filter_the_distribution():
    model = FixedLogits()
    assert set(generate(model, [0], 300, top_k=2, seed=0)) == {0, 1}
    assert set(generate(model, [0], 300, top_p=0.7, seed=0)) == {0, 1}  # 0.5 < 0.7 <= 0.5 + 0.3
    assert set(generate(model, [0], 300, top_p=0.85, seed=0)) == {0, 1, 2}
    assert set(generate(model, [0], 300, seed=0)) == {0, 1, 2, 3}
    counts = torch.bincount(torch.tensor(generate(model, [0], 2000, seed=0)), minlength=4) / 2000
    assert torch.allclose(counts, torch.tensor([0.5, 0.3, 0.15, 0.05]), atol=0.04)


@pytest.mark.parametrize("kwargs, message", [
    (dict(prompt_ids=[]), "the prompt is empty"),
    (dict(max_tokens=-1), "max_tokens must be >= 0"),
    (dict(temperature=-0.5), "temperature must be a finite number >= 0"),
    (dict(temperature=float("nan")), "temperature must be a finite number >= 0"),
    (dict(top_k=0), "top_k must be >= 1"),
    (dict(top_p=0.0), "top_p must be in"),
])
def test_bad_arguments(kwargs, message):
    args = dict(prompt_ids=[0], max_tokens=3) | kwargs
    with pytest.raises(ValueError, match=message):
        generate(FixedLogits(), **args)


def test_logits_that_are_not_finite_are_a_located_error_not_a_sampler_crash():
    from lmspec.runtime.errors import CheckpointError

    model = FixedLogits()
    with torch.no_grad():  # -inf rules a token out and is no error
        model.logits[2:] = float("-inf")
    assert set(generate(model, [0], 200, seed=0)) == {0, 1}
    for bad in (float("nan"), float("inf")):  # torch.multinomial's own error named neither the cause nor a cure
        with torch.no_grad():
            model.logits[3] = bad
        for temperature in (1.0, 0.0):
            with pytest.raises(CheckpointError, match="next-token scores are not finite .* sample an earlier"):
                generate(model, [0], 3, temperature=temperature, seed=0)


def test_zero_tokens():
    assert generate(FixedLogits(), [0], 0) == []


def test_encode_prompt_for_an_empty_prompt():
    with_newline = CharTokenizer.from_text("ab\n")
    assert encode_prompt(with_newline, "") == with_newline.encode("\n")
    assert encode_prompt(with_newline, "ba") == [2, 1]
    assert encode_prompt(CharTokenizer.from_text("xyz"), "") == [0]
