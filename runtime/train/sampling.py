"""Autoregressive sampling: greedy, temperature, top-k and nucleus (top-p), with the KV cache.

With a cache, the prompt is run once and each new token costs one position. Without one (the
model's attention cannot use it), or once the cache is full, every token re-runs the model over
the last `model.context` tokens (a sliding window), so generation may run past the context.
"""
from __future__ import annotations

import math

import torch

from lmspec.compiler.kv_cache import make_cache
from lmspec.runtime.errors import CheckpointError


def generate(
    model: torch.nn.Module,
    prompt_ids: list[int],
    max_tokens: int,
    temperature: float = 1.0,
    top_k: int | None = None,
    top_p: float | None = None,
    seed: int | None = None,
    eot_id: int | None = None,
    stop_ids: tuple[int, ...] = (),
) -> list[int]:
    """The new tokens that follow `prompt_ids` (at most `max_tokens`; stops after `eot_id` or any of
    `stop_ids`, such as a chat template's end-of-turn token).

    temperature 0 picks the most likely token (greedy); `seed` makes sampling reproducible."""
    check_arguments(prompt_ids, max_tokens, temperature, top_k, top_p)
    if max_tokens == 0:
        return []
    context = int(model.context)
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    generator = torch.Generator(device=device).manual_seed(seed) if seed is not None else None

    ids = list(prompt_ids)
    new: list[int] = []
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            window = ids[-context:]
            cache = make_cache(model, context)
            logits = model(torch.tensor([window], device=device), cache)
            if cache is not None:
                cache.advance(len(window))
            while len(new) < max_tokens:
                token = _pick(logits[0, -1], temperature, top_k, top_p, generator)
                new.append(token)
                ids.append(token)
                if token == eot_id or token in stop_ids or len(new) == max_tokens:
                    break
                if cache is not None and cache.offset < cache.max_len:
                    logits = model(torch.tensor([[token]], device=device), cache)
                    cache.advance(1)
                else:
                    cache = None  # full: the model may not see more than `context` positions
                    logits = model(torch.tensor([ids[-context:]], device=device))
    finally:
        model.train(was_training)
    return new


def encode_prompt(tokenizer, text: str) -> list[int]:
    """The ids to condition on for `text`. A model needs at least one token, so an empty prompt
    starts from the end-of-text token where the tokenizer has one (GPT-2's convention), else from
    a newline (nanoGPT's), else from token 0."""
    if text:
        return tokenizer.encode(text)
    if tokenizer.eot_id is not None:
        return [tokenizer.eot_id]
    try:
        return tokenizer.encode("\n") or [0]
    except ValueError:  # no newline in a character vocabulary
        return [0]


def _pick(logits: torch.Tensor, temperature: float, top_k: int | None, top_p: float | None,
          generator: torch.Generator | None) -> int:
    """One token id from a [vocab] row of logits."""
    logits = logits.float()
    if not math.isfinite(float(logits.max())):  # max propagates NaN; a -inf below it is a token ruled out
        raise CheckpointError("the model's next-token scores are not finite (NaN or inf): its weights are, as "
                              "after a run that diverged; sample an earlier checkpoint")
    if temperature == 0:
        return int(torch.argmax(logits))
    logits = logits / temperature
    if top_k is not None and top_k < logits.numel():
        kth = torch.topk(logits, top_k).values[-1]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if top_p is not None and top_p < 1.0:
        sorted_logits, order = torch.sort(logits, descending=True)
        probs = torch.softmax(sorted_logits, dim=-1)
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop = (torch.cumsum(probs, dim=-1) - probs) >= top_p
        logits = logits.masked_fill(torch.zeros_like(drop).scatter(0, order, drop), float("-inf"))
    probs = torch.softmax(logits, dim=-1)
    return int(torch.multinomial(probs, 1, generator=generator))


def check_arguments(prompt_ids, max_tokens, temperature, top_k, top_p) -> None:
    if len(prompt_ids) == 0:
        raise ValueError("the prompt is empty: give at least one token to condition on (see encode_prompt)")
    if max_tokens < 0:
        raise ValueError(f"max_tokens must be >= 0, got {max_tokens}")
    if not 0 <= temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {temperature}")
    if top_k is not None and top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {top_k}")
    if top_p is not None and not 0 < top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {top_p}")
