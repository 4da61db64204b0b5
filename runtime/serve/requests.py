"""What a generation request asks for and what comes back, token by token: the request, each token's
event and log-probabilities, the logit adjustments and the sampler, the streamed text that stops at
stop strings, and one row being generated. Shared by every decode loop (serve/language_model.py's
own, and the running batches of serve/running_batch.py and serve/slot_batch.py); no onnxruntime here.
"""
from __future__ import annotations

import math
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np


@dataclass
class GenerationRequest:
    """One prompt and how to continue it. temperature 0 is greedy."""

    prompt_ids: list[int]
    max_tokens: int = 64
    temperature: float = 1.0
    top_k: int | None = None
    top_p: float | None = None
    seed: int | None = None
    stop: tuple[str, ...] = ()  # strings that end the completion (not included in its text)
    stop_at_eot: bool = True  # end at the tokenizer's end-of-text token (not included either)
    stop_ids: tuple[int, ...] = ()  # further token ids that end it, e.g. a chat template's <|im_end|>
    logit_bias: dict[int, float] | None = None  # added to those tokens' logits before sampling
    presence_penalty: float = 0.0  # taken from a token's logit once it has been generated
    frequency_penalty: float = 0.0  # taken from a token's logit once per time it has been generated
    logprobs: int | None = None  # None: none; k: each new token's log-probability and the k likeliest
    prompt_logprobs: bool = False  # also the log-probability of each prompt token after the first


@dataclass
class Completion:
    tokens: list[int]  # the new tokens, without a stop token
    text: str  # their text, cut before a stop string
    finish_reason: str  # "stop" (end-of-text, stop token or string) or "length" (max_tokens)
    prompt_tokens: int


@dataclass(frozen=True)
class Scored:
    """A token with its log-probability under the model (None for a prompt's first token, which
    nothing predicts) and the `k` likeliest tokens at its place, as (token, log-probability), best first."""

    token: int
    logprob: float | None
    top: tuple[tuple[int, float], ...] = ()


@dataclass
class TokenEvent:
    """A step of a streamed generation: request `index` has new `text` (possibly empty while a
    multi-byte character or a possible stop string is incomplete); `finish_reason` is set on its last.
    With logprobs asked, `scored` is the new token's (a stop token's too); with prompt_logprobs, a
    request's first event carries `prompt`, one Scored per prompt token."""

    index: int
    token: int | None
    text: str
    finish_reason: str | None = None
    scored: Scored | None = None
    prompt: list[Scored] | None = None


def check_request(request: GenerationRequest, vocab_size: int) -> None:
    """Raise ValueError, with a message for the user, for arguments generation cannot use."""
    if not request.prompt_ids:
        raise ValueError("the prompt is empty: give at least one token to condition on")
    bad = next((i for i in request.prompt_ids if not 0 <= int(i) < vocab_size), None)
    if bad is not None:
        raise ValueError(f"token id {bad} is outside the vocabulary of {vocab_size:,}")
    if not isinstance(request.max_tokens, int) or request.max_tokens < 0:
        raise ValueError(f"max_tokens must be an integer >= 0, got {request.max_tokens!r}")
    if not 0 <= request.temperature < math.inf:
        raise ValueError(f"temperature must be a finite number >= 0 (0 is greedy), got {request.temperature}")
    if request.top_k is not None and request.top_k < 1:
        raise ValueError(f"top_k must be >= 1, got {request.top_k}")
    if request.top_p is not None and not 0 < request.top_p <= 1:
        raise ValueError(f"top_p must be in (0, 1], got {request.top_p}")
    bad = next((t for t in request.logit_bias or {} if not 0 <= int(t) < vocab_size), None)
    if bad is not None:
        raise ValueError(f"logit_bias: token id {bad} is outside the vocabulary of {vocab_size:,}")
    if request.logprobs is not None and not 0 <= request.logprobs <= vocab_size:
        raise ValueError(f"logprobs must be between 0 and the vocabulary size, got {request.logprobs}")


def adjusted_logits(logits: np.ndarray, request: GenerationRequest, counts: Counter) -> np.ndarray:
    """A row's logits with the request's logit_bias and presence and frequency penalties applied, as
    OpenAI defines them: logit[j] -= count[j] * frequency_penalty + (count[j] > 0) * presence_penalty."""
    penalised = counts and (request.presence_penalty or request.frequency_penalty)
    if not request.logit_bias and not penalised:
        return logits
    logits = logits.astype(np.float64)
    if request.logit_bias:
        ids = np.fromiter(request.logit_bias, dtype=np.int64)
        np.add.at(logits, ids, np.fromiter(request.logit_bias.values(), dtype=np.float64))
    if penalised:
        ids = np.fromiter(counts, dtype=np.int64)
        times = np.fromiter(counts.values(), dtype=np.float64)
        logits[ids] -= times * request.frequency_penalty + request.presence_penalty
    return logits


def log_softmax(logits: np.ndarray) -> np.ndarray:
    """Log-probabilities over the last axis, in float64 (the logits themselves may be float16)."""
    x = logits.astype(np.float64)
    x -= x.max(axis=-1, keepdims=True)
    return x - np.log(np.exp(x).sum(axis=-1, keepdims=True))


def scored(token: int, logprobs: np.ndarray, k: int) -> Scored:
    """`token` with its log-probability from a [vocab] row of them, and the row's k likeliest."""
    return Scored(token, float(logprobs[token]), top_logprobs(logprobs, k))


def top_logprobs(logprobs: np.ndarray, k: int) -> tuple[tuple[int, float], ...]:
    if k <= 0:
        return ()
    best = np.argpartition(-logprobs, k - 1)[:k] if k < logprobs.size else np.arange(logprobs.size)
    best = best[np.argsort(-logprobs[best], kind="stable")]
    return tuple((int(t), float(logprobs[t])) for t in best)


def scored_prompt(prompt: list[int], logits: np.ndarray, k: int) -> list[Scored]:
    """Each prompt token's log-probability given the tokens before it, from the prompt's logits
    [len(prompt), vocab] (the first token's is None, as OpenAI's echo gives it)."""
    out = [Scored(prompt[0], None)]
    for t in range(1, len(prompt)):
        out.append(scored(prompt[t], log_softmax(logits[t - 1]), k))
    return out


def pick_token(logits: np.ndarray, temperature: float, top_k: int | None, top_p: float | None,
               rng: np.random.Generator) -> int:
    """One token id from a [vocab] row of logits: the same rules as the PyTorch sampler."""
    logits = logits.astype(np.float64)
    if temperature == 0:
        return int(np.argmax(logits))
    logits = logits / temperature
    if top_k is not None and top_k < logits.size:
        kth = np.partition(logits, -top_k)[-top_k]
        logits = np.where(logits < kth, -np.inf, logits)
    if top_p is not None and top_p < 1.0:
        order = np.argsort(-logits, kind="stable")
        probs = _softmax(logits[order])
        # Drop a token when the tokens ranked above it already reach top_p (the first always stays).
        drop = (np.cumsum(probs) - probs) >= top_p
        logits[order[drop]] = -np.inf
    probs = _softmax(logits)
    return int(rng.choice(probs.size, p=probs))


def _softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - np.max(x))
    return e / e.sum()


class TextStream:
    """Turns a row's tokens into text deltas that are safe to show: never half a UTF-8 character,
    never text that a stop string may still claim."""

    def __init__(self, decode: Callable[[list[int]], str], stop: tuple[str, ...]):
        self.decode, self.stop = decode, tuple(s for s in stop if s)
        self.tokens: list[int] = []
        self.sent = 0  # characters of the text already handed out
        self.text = ""

    def push(self, token: int) -> tuple[str, bool]:
        """Add a token; return (new text to show, whether a stop string has appeared)."""
        self.tokens.append(token)
        self.text = self.decode(self.tokens)
        hit = min((i for i in (self.text.find(s, max(0, self.sent - len(s))) for s in self.stop) if i >= 0),
                  default=-1)
        if hit >= 0:
            self.text = self.text[:hit]
            return self._take(len(self.text)), True
        safe = len(self.text)
        if self.text.endswith("\ufffd"):  # an incomplete multi-byte character: wait for its other bytes
            safe = len(self.text.rstrip("\ufffd"))
        for s in self.stop:  # hold back a tail that could be the start of a stop string
            for k in range(min(len(s) - 1, safe - self.sent), 0, -1):
                if self.text[safe - k:safe] == s[:k]:
                    safe -= k
                    break
        return self._take(safe), False

    def finish(self) -> str:
        return self._take(len(self.text))

    def _take(self, upto: int) -> str:
        upto = max(upto, self.sent)
        delta = self.text[self.sent:upto]
        self.sent = upto
        return delta


@dataclass(eq=False)
class Row:
    """One request being generated: its sampler, its text so far and how it may end."""

    index: int
    request: GenerationRequest
    rng: np.random.Generator
    stream: TextStream
    stops: frozenset
    new: list[int] = field(default_factory=list)
    counts: Counter = field(default_factory=Counter)  # generated tokens, for the penalties
    finish_reason: str | None = None


def logits_wanted(rows: list[Row], columns: int = 1) -> int | None:
    """How many of a prefill's last positions need logits: `columns` (those that hold each row's
    last token), or all of them (None) where a row asks for its prompt's log-probabilities."""
    return None if any(row.request.prompt_logprobs for row in rows) else columns


def first_events(model, rows: list[Row], prompts: list[list[int]], every: list[np.ndarray]) -> list[TokenEvent]:
    """Each prefilled row's first event, from its prompt's logits `every` [positions, vocab] (the
    last position's its last token's; all of the prompt's where it asks for their log-probabilities):
    its first token picked by `model.advance` (or its end, for max_tokens 0), and its prompt's
    log-probabilities where asked for."""
    events = []
    for row, prompt, own in zip(rows, prompts, every):
        request = row.request
        if request.max_tokens == 0:
            row.finish_reason = "length"
            event = TokenEvent(row.index, None, "", "length")
        else:
            event = model.advance(row, own[-1])
        if request.prompt_logprobs:
            event.prompt = scored_prompt(prompt, own, request.logprobs or 0)
        events.append(event)
    return events


def end_at_context(row: Row) -> TokenEvent:
    """End a row whose cache is full (the server never lets a request ask for more than fits)."""
    row.finish_reason = "length"
    return TokenEvent(row.index, None, row.stream.finish(), "length")
