"""Text generation by an exported language model in onnxruntime: sampling, the KV cache, batches of
prompts of different lengths, streamed text that stops at stop strings. No torch on this path.

Generation keeps the KV cache between steps, batches prompts of different lengths by padding them on
the left (with an attention mask and per-row positions), and drops finished rows from the batch as it
goes; once the cache is full, it goes on over a sliding window of the last `context` tokens. The
bundle itself (its sidecar, tokenizer and session) is read by runtime/export/bundle.py.
"""
from __future__ import annotations

import os
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

import numpy as np

from lmspec.runtime.export.bundle import (
    CLASSIFIER,
    BundleError,
    bundle_kind,
    bundle_sidecar,
    bundle_tokenizer,
    find_model_file,
    open_session,
    read_sidecar,
)


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
    if request.temperature < 0:
        raise ValueError(f"temperature must be >= 0 (0 is greedy), got {request.temperature}")
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


class OnnxModel:
    """An exported model in an onnxruntime session, with its tokenizer and generation settings."""

    def __init__(self, path: str | os.PathLike, providers: list[str] | None = None, threads: int | None = None):
        self.path = find_model_file(path)
        self.meta = read_sidecar(self.path)
        if bundle_kind(self.meta) == CLASSIFIER:
            raise BundleError(f"{self.path}: an exported classifier ({', '.join(self.meta['labels'])}), not a "
                              f"language model: it does not generate text; use `lmspec classify {self.path} TEXT...`")
        self.tokenizer = bundle_tokenizer(self.path, self.meta)
        self.session = open_session(self.path, threads, providers)
        self.name: str = self.meta["name"]
        self.context: int = self.meta["context"]
        self.vocab_size: int = self.meta["vocab_size"]
        self.eot_id: int | None = self.tokenizer.eot_id
        cache = self.meta.get("cache")
        self.cache_layers: int = cache["layers"] if cache else 0
        self._past_shapes = ([(kv, hd) for kv, hd in zip(cache["kv_heads"], cache["head_dim"]) for _ in range(2)]
                             if cache else [])
        self._past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        if len(self._past_names) != len(self._past_shapes):
            raise BundleError(f"{bundle_sidecar(self.path)}: describes {len(self._past_shapes)} cache tensors, "
                              f"but {self.path.name} takes {len(self._past_names)}")
        kinds = {i.type for i in self.session.get_inputs() if i.name in self._past_names}
        self._float = np.float16 if kinds == {"tensor(float16)"} else np.float32

    @property
    def uses_cache(self) -> bool:
        return bool(self._past_names)

    @property
    def cache_bytes_per_position(self) -> int:
        """What the KV cache holds for one token of one row: the keys and values of every layer."""
        return sum(kv * hd for kv, hd in self._past_shapes) * np.dtype(self._float).itemsize

    @property
    def weight_bytes(self) -> int:
        """The size of the model's file, with its external data file when its weights are kept apart."""
        data = self.path.with_name(self.path.name + ".data")
        return self.path.stat().st_size + (data.stat().st_size if data.is_file() else 0)

    # ------------------------------------------------------------------------------ one forward

    def forward(self, ids: np.ndarray, mask: np.ndarray | None = None, positions: np.ndarray | None = None,
                past: list[np.ndarray] | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [batch, seq, vocab] for `ids` [batch, seq], and the cache after them."""
        ids = np.asarray(ids, dtype=np.int64)
        if not self.uses_cache:
            return self.session.run(["logits"], {"input_ids": ids})[0], []
        batch, seq = ids.shape
        if past is None:
            past = [np.zeros((batch, kv, 0, hd), dtype=self._float) for kv, hd in self._past_shapes]
        past_len = past[0].shape[2]
        if mask is None:
            mask = np.ones((batch, past_len + seq), dtype=np.int64)
        if positions is None:
            positions = positions_from_mask(mask)[:, past_len:]
        feeds = {"input_ids": ids, "attention_mask": mask.astype(np.int64), "position_ids": positions.astype(np.int64)}
        feeds.update(zip(self._past_names, past))
        out = self.session.run(None, feeds)
        return out[0], out[1:]

    # ------------------------------------------------------------------------------ generation

    def generate(self, requests: list[GenerationRequest]) -> list[Completion]:
        """Continue every prompt; the completions come back in the order of the requests."""
        rows = self._rows(requests)
        for _ in self._run(rows):
            pass
        return [Completion(row.new, row.stream.text, row.finish_reason, len(row.request.prompt_ids)) for row in rows]

    def stream(self, requests: list[GenerationRequest]) -> Iterator[TokenEvent]:
        """Generate for all requests at once, yielding each token's event as it is produced."""
        return self._run(self._rows(requests))

    def _rows(self, requests: list[GenerationRequest]) -> list[Row]:
        for request in requests:
            check_request(request, self.vocab_size)
        return [self.new_row(i, r) for i, r in enumerate(requests)]

    def _run(self, rows: list[Row]) -> Iterator[TokenEvent]:
        live = []
        for row in rows:
            if row.request.max_tokens == 0:
                row.finish_reason = "length"
                yield TokenEvent(row.index, None, "", "length")
            else:
                live.append(row)
        if not live:
            return
        if self.uses_cache:
            yield from self._generate_cached(live)
        else:  # no padding mask in such a graph: each prompt runs on its own
            for row in live:
                yield from self._generate_windowed([row], [list(row.request.prompt_ids)[-self.context:]])

    def new_row(self, index: int, request: GenerationRequest) -> Row:
        stops = set(request.stop_ids)
        if request.stop_at_eot and self.eot_id is not None:
            stops.add(self.eot_id)
        return Row(index, request, np.random.default_rng(request.seed), TextStream(self.tokenizer.decode, request.stop),
                    frozenset(stops))

    def advance(self, row: Row, logits: np.ndarray) -> TokenEvent:
        """Pick the row's next token from its last logits; finish the row where it must."""
        r = row.request
        token = pick_token(adjusted_logits(logits, r, row.counts), r.temperature, r.top_k, r.top_p, row.rng)
        score = None if r.logprobs is None else scored(token, log_softmax(logits), r.logprobs)
        if token in row.stops:
            row.finish_reason = "stop"
            return TokenEvent(row.index, token, row.stream.finish(), "stop", score)
        row.new.append(token)
        if r.presence_penalty or r.frequency_penalty:
            row.counts[token] += 1
        text, hit = row.stream.push(token)
        if hit:
            row.finish_reason = "stop"
            row.new = _tokens_before(row.new, len(row.stream.text), self.tokenizer.decode)
        elif len(row.new) >= r.max_tokens:
            row.finish_reason = "length"
            text += row.stream.finish()
        return TokenEvent(row.index, token, text, row.finish_reason, score)

    def _generate_cached(self, rows: list[Row]) -> Iterator[TokenEvent]:
        prompts = [list(row.request.prompt_ids)[-self.context:] for row in rows]
        ids, mask = left_pad(prompts, pad_id=0)
        logits, past = self.forward(ids, mask)
        while True:
            events = [self.advance(row, logits[i, -1]) for i, row in enumerate(rows)]
            yield from events
            keep = [i for i, row in enumerate(rows) if row.finish_reason is None]
            if not keep:
                return
            if len(keep) < len(rows):
                rows = [rows[i] for i in keep]
                ids, mask = ids[keep], mask[keep]
                past = [p[keep] for p in past]
            column = np.array([[row.new[-1]] for row in rows], dtype=np.int64)
            ids = np.concatenate([ids, column], axis=1)
            mask = np.concatenate([mask, np.ones((len(rows), 1), dtype=np.int64)], axis=1)
            if ids.shape[1] > self.context:  # the cache is full: from here on, a sliding window
                yield from self._generate_windowed(rows, [list(r) for r in ids], [list(m) for m in mask])
                return
            logits, past = self.forward(column, mask, positions_from_mask(mask)[:, -1:], past)

    def _generate_windowed(self, rows: list[Row], ids: list[list[int]],
                           masks: list[list[int]] | None = None) -> Iterator[TokenEvent]:
        """Each step re-runs the last `context` tokens without a cache, as the PyTorch sampler does
        once its cache is full: generation may go on past the context."""
        masks = masks or [[1] * len(r) for r in ids]
        while True:
            window = np.array([r[-self.context:] for r in ids], dtype=np.int64)
            window_mask = np.array([m[-self.context:] for m in masks], dtype=np.int64)
            if self.uses_cache:
                logits, _ = self.forward(window, window_mask)
            else:
                logits, _ = self.forward(window)
            events = [self.advance(row, logits[i, -1]) for i, row in enumerate(rows)]
            yield from events
            keep = [i for i, row in enumerate(rows) if row.finish_reason is None]
            if not keep:
                return
            rows = [rows[i] for i in keep]
            ids = [ids[i] + [rows[j].new[-1]] for j, i in enumerate(keep)]
            masks = [masks[i] + [1] for i in keep]


def _tokens_before(tokens: list[int], chars: int, decode) -> list[int]:
    """The shortest prefix of `tokens` whose text covers the first `chars` characters."""
    for n in range(len(tokens) + 1):
        if len(decode(tokens[:n])) >= chars:
            return tokens[:n]
    return tokens


def left_pad(prompts: list[list[int]], pad_id: int) -> tuple[np.ndarray, np.ndarray]:
    """Token ids [batch, longest] padded on the left, and the mask that marks the real tokens."""
    longest = max(len(p) for p in prompts)
    ids = np.full((len(prompts), longest), pad_id, dtype=np.int64)
    mask = np.zeros((len(prompts), longest), dtype=np.int64)
    for i, p in enumerate(prompts):
        ids[i, longest - len(p):] = p
        mask[i, longest - len(p):] = 1
    return ids, mask


def positions_from_mask(mask: np.ndarray) -> np.ndarray:
    """Each token's position counting only real tokens: padding on the left does not shift them."""
    return np.maximum(np.cumsum(mask, axis=1) - 1, 0)
