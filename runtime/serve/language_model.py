"""Text generation by an exported language model in onnxruntime: sampling, the KV cache, batches of
prompts of different lengths, streamed text that stops at stop strings. No torch on this path.

Generation keeps the KV cache between steps, batches prompts of different lengths by padding them on
the left (with an attention mask and per-row positions), and drops finished rows from the batch as it
goes; once the cache is full, it goes on over a sliding window of the last `context` tokens. A bundle
exported with fused attention keeps its cache in one buffer per layer instead, updated in place, each
row at its own length (serve/slot_batch.py runs it). The bundle itself (its sidecar, tokenizer and
session) is read by runtime/export/bundle.py.
"""
from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np

from lmspec.compiler.onnx_last_logits import LOGITS_TO_KEEP
from lmspec.runtime.export.bundle import (
    CLASSIFIER,
    SHARED_BUFFER,
    BundleError,
    bundle_kind,
    bundle_sidecar,
    bundle_tokenizer,
    find_model_file,
    open_session,
    read_sidecar,
)
from lmspec.runtime.serve.requests import (
    adjusted_logits,
    check_request,
    Completion,
    GenerationRequest,
    log_softmax,
    pick_token,
    Row,
    scored,
    TextStream,
    TokenEvent,
)


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
        # per cache tensor, the most positions it keeps (a sliding-window layer's), or None: all
        self.kept: list[int | None] = [k for k in (cache.get("kept") or [None] * cache["layers"]) for _ in range(2)] \
            if cache else []
        self._past_names = [i.name for i in self.session.get_inputs() if i.name.startswith("past_key_values.")]
        if len(self._past_names) != len(self._past_shapes):
            raise BundleError(f"{bundle_sidecar(self.path)}: describes {len(self._past_shapes)} cache tensors, "
                              f"but {self.path.name} takes {len(self._past_names)}")
        kinds = {i.type for i in self.session.get_inputs() if i.name in self._past_names}
        self._float = np.float16 if kinds == {"tensor(float16)"} else np.float32
        self.shared_buffer = bool(cache) and cache.get("buffer") == SHARED_BUFFER
        self._present_names = [o.name for o in self.session.get_outputs() if o.name.startswith("present.")]
        # whether a prefill asks the export for the logits of its last positions only (logits_to_keep);
        # an export from before it computes them all, and the last are sliced here
        self.asks_for_kept_logits = LOGITS_TO_KEEP in {i.name for i in self.session.get_overridable_initializers()}

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
                past: list[np.ndarray] | None = None, last: int | None = None) -> tuple[np.ndarray, list[np.ndarray]]:
        """Logits [batch, seq, vocab] for `ids` [batch, seq], and the cache after them; with `last`,
        the logits of the last `last` positions only, [batch, last, vocab]."""
        ids = np.asarray(ids, dtype=np.int64)
        if not self.uses_cache:
            return self._kept(self.session.run(["logits"], {"input_ids": ids, **self._keep_feed(last)})[0], last), []
        batch, seq = ids.shape
        if self.shared_buffer:
            # The mask counts each row's length after this call (a prompt's rows padded on the right);
            # the buffers are the cache so far, or a new one for a prompt.
            mask = np.ones((batch, seq), dtype=np.int64) if mask is None else mask
            past = self.new_cache(batch, mask.shape[1]) if past is None else past
            if positions is None:
                start = 0 if seq == mask.shape[1] else mask.sum(axis=1, keepdims=True) - seq
                positions = start + np.arange(seq)[None]
        else:
            if past is None:
                past = [np.zeros((batch, kv, 0, hd), dtype=self._float) for kv, hd in self._past_shapes]
            past_len = mask.shape[1] - seq if mask is not None else self._past_length(past)
            if mask is None:
                mask = np.ones((batch, past_len + seq), dtype=np.int64)
            if positions is None:
                positions = positions_from_mask(mask)[:, past_len:]
        feeds = {"input_ids": ids, "attention_mask": mask.astype(np.int64), "position_ids": positions.astype(np.int64)}
        feeds.update(zip(self._past_names, past))
        out = self.session.run(None, {**feeds, **self._keep_feed(last)})
        return self._kept(out[0], last), out[1:]

    def _keep_feed(self, last: int | None) -> dict[str, np.ndarray]:
        return {LOGITS_TO_KEEP: np.array(last, dtype=np.int64)} if last and self.asks_for_kept_logits else {}

    def _kept(self, logits: np.ndarray, last: int | None) -> np.ndarray:
        """The last `last` positions' logits, whether the export computed only those or all of them."""
        return logits[:, -last:] if last and logits.shape[1] > last else logits

    def _past_length(self, past: list[np.ndarray]) -> int:
        """The positions a cache holds, read from a tensor of a layer that keeps them all."""
        whole = [p.shape[2] for p, kept in zip(past, self.kept) if kept is None]
        if not whole:
            raise ValueError("every layer of this model keeps a window of its cache: pass the mask, which "
                             "says how long the sequence is")
        return whole[0]

    def fit_cache(self, past: list[np.ndarray], length: int) -> list[np.ndarray]:
        """`past` cut or padded (with zeros) on the left to hold `length` positions, each tensor no
        more than its layer keeps: the cache of a batch whose mask has `length` columns."""
        fitted = []
        for tensor, kept in zip(past, self.kept):
            target = length if kept is None else min(length, kept)
            have = tensor.shape[2]
            if have > target:
                tensor = np.ascontiguousarray(tensor[:, :, have - target:])
            elif have < target:
                tensor = np.pad(tensor, [(0, 0), (0, 0), (target - have, 0), (0, 0)])
            fitted.append(tensor)
        return fitted

    def new_cache(self, rows: int, length: int | None = None) -> list[np.ndarray]:
        """Empty shared buffers, [rows, kv_heads, length (default: the context), head_dim] per cache
        tensor. Zeros from the allocator: pages no row reaches cost no memory."""
        return [np.zeros((rows, kv, length or self.context, hd), dtype=self._float) for kv, hd in self._past_shapes]

    def forward_in_place(self, ids: np.ndarray, mask: np.ndarray, positions: np.ndarray,
                         buffers: list[np.ndarray], last: int | None = None) -> np.ndarray:
        """Logits [batch, seq, vocab] of a shared-buffer model (with `last`, of the last `last`
        columns only), which writes the new keys and values into `buffers` (contiguous arrays, each
        bound as both past and present: nothing is copied). `mask` has as many ones in each row as
        the row's length after this call."""
        import onnxruntime as ort

        binding = self.session.io_binding()
        binding.bind_output("logits")
        binding.bind_cpu_input("input_ids", np.ascontiguousarray(ids, dtype=np.int64))
        binding.bind_cpu_input("attention_mask", np.ascontiguousarray(mask, dtype=np.int64))
        binding.bind_cpu_input("position_ids", np.ascontiguousarray(positions, dtype=np.int64))
        keep = self._keep_feed(last)  # kept alive until the run: the binding points into its arrays
        for name, value in keep.items():  # bind_cpu_input looks up graph inputs only, not initializers
            binding.bind_ortvalue_input(name, ort.OrtValue.ortvalue_from_numpy(value))
        for past, present, buffer in zip(self._past_names, self._present_names, buffers):
            value = ort.OrtValue.ortvalue_from_numpy(buffer)
            binding.bind_ortvalue_input(past, value)
            binding.bind_ortvalue_output(present, value)
        self.session.run_with_iobinding(binding)
        return self._kept(binding.get_outputs()[0].numpy(), last)

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
        if self.shared_buffer:
            yield from self._generate_in_slots(live)
        elif self.uses_cache:
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
        logits, past = self.forward(ids, mask, last=1)
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

    def _generate_in_slots(self, rows: list[Row]) -> Iterator[TokenEvent]:
        """Every row in its own slot of one shared buffer; a row whose cache fills up goes on alone
        over a sliding window, as _generate_cached's rows do."""
        from lmspec.runtime.serve.slot_batch import SlotBatch

        batch = SlotBatch(self, len(rows))
        yield from batch.join(rows)
        while len(batch):
            for row in batch.discard_full():
                yield from self._generate_windowed([row], [list(row.request.prompt_ids)[-self.context:] + row.new])
            if len(batch):
                yield from batch.step()

    def _generate_windowed(self, rows: list[Row], ids: list[list[int]],
                           masks: list[list[int]] | None = None) -> Iterator[TokenEvent]:
        """Each step re-runs the last `context` tokens without a cache, as the PyTorch sampler does
        once its cache is full: generation may go on past the context."""
        masks = masks or [[1] * len(r) for r in ids]
        while True:
            window = np.array([r[-self.context:] for r in ids], dtype=np.int64)
            window_mask = np.array([m[-self.context:] for m in masks], dtype=np.int64)
            if self.shared_buffer:  # its prompts are padded on the right, if at all: one row at a time
                logits = np.concatenate([self.forward(np.array([r[-self.context:]]), last=1)[0] for r in ids])
            elif self.uses_cache:
                logits, _ = self.forward(window, window_mask, last=1)
            else:
                logits, _ = self.forward(window, last=1)
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
