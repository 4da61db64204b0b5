"""The running batch of a bundle exported with fused attention: each row owns a slot of one KV
buffer per layer, and rows of any lengths decode together without padding.

The buffers are [capacity, kv_heads, context, head_dim], allocated once. Row i of the batch is in
slot i and holds lengths[i] positions. A decode step runs the first len(rows) slots: onnxruntime's
GroupQueryAttention writes each row's new keys and values at its own length and attends over that
row's keys only, in place (serve/language_model.py's forward_in_place). Joining rows are prefilled
together into the next free slots, their prompts padded on the right. A leaving row's slot is filled
by the last row (its cache copied, up to its length), so the rows in use stay slots 0..n-1. A row
whose cache is full ends with finish_reason "length", as in the cohort batch (serve/running_batch.py),
whose interface this one shares for the scheduler.
"""
from __future__ import annotations

import numpy as np

from lmspec.runtime.serve.requests import Row, TokenEvent, end_at_context, first_events, logits_wanted


class SlotBatch:
    """The rows being generated now, each in a slot of a shared KV buffer."""

    def __init__(self, model, capacity: int):  # an OnnxModel of a fused-attention bundle
        self.model, self.capacity = model, capacity
        self.rows: list[Row] = []  # rows[i] is in slot i
        self.lengths = np.zeros(capacity, dtype=np.int64)  # positions each slot's cache holds
        self.buffers = model.new_cache(capacity)

    def __len__(self) -> int:
        return len(self.rows)

    def join(self, rows: list[Row]) -> list[TokenEvent]:
        """Prefill `rows` into the next free slots; return each one's first event. Rows that end
        there (max_tokens 0, a stop) leave at once."""
        if len(self.rows) + len(rows) > self.capacity:
            raise ValueError(f"{len(rows)} rows do not fit: {len(self.rows)} of {self.capacity} slots are taken")
        prompts = [list(row.request.prompt_ids)[-self.model.context:] for row in rows]
        lengths = np.array([len(p) for p in prompts], dtype=np.int64)
        ids = np.zeros((len(rows), int(lengths.max())), dtype=np.int64)
        for i, prompt in enumerate(prompts):
            ids[i, :len(prompt)] = prompt
        mask = _ones_up_to(lengths)
        positions = np.broadcast_to(np.arange(ids.shape[1]), ids.shape)
        first = len(self.rows)
        # the columns from the shortest prompt's last token on hold every row's last token
        last = logits_wanted(rows, int(lengths.max() - lengths.min()) + 1)
        logits = self.model.forward_in_place(ids, mask, positions, self._slots(first, first + len(rows)), last)
        self.rows += rows
        self.lengths[first:first + len(rows)] = lengths
        start = ids.shape[1] - logits.shape[1]  # the prompt position of the first column of logits
        events = first_events(self.model, rows, prompts, [logits[i, :n - start] for i, n in enumerate(lengths)])
        self._drop_finished()
        return events

    def step(self) -> list[TokenEvent]:
        """One decode step for every row: each one's next token, then the finished rows leave."""
        events = [end_at_context(row) for row in self.discard_full()]
        if not self.rows:
            return events
        n = len(self.rows)
        now = self.lengths[:n]
        column = np.array([[row.new[-1]] for row in self.rows], dtype=np.int64)
        logits = self.model.forward_in_place(column, _ones_up_to(now + 1), now[:, None], self._slots(0, n))
        self.lengths[:n] += 1
        events += [self.model.advance(row, logits[i, -1]) for i, row in enumerate(self.rows)]
        self._drop_finished()
        return events

    def discard_full(self) -> list[Row]:
        """Take out the rows whose cache has no room for their next token, and return them."""
        full = [row for row, n in zip(self.rows, self.lengths) if n >= self.model.context]
        self.discard(set(full))
        return full

    def discard(self, rows: set[Row]) -> None:
        """Drop these rows (their client gone, their time up, or finished)."""
        gone = [i for i, row in enumerate(self.rows) if row in rows]
        for i in reversed(gone):  # from the back: the row moved into slot i is never one to drop
            last = len(self.rows) - 1
            if i != last:
                length = int(self.lengths[last])
                for buffer in self.buffers:
                    buffer[i, :, :length] = buffer[last, :, :length]
                self.lengths[i] = length
                self.rows[i] = self.rows[last]
            self.rows.pop()

    def clear(self) -> list[Row]:
        rows, self.rows = self.rows, []
        return rows

    def _drop_finished(self) -> None:
        self.discard({row for row in self.rows if row.finish_reason is not None})

    def _slots(self, start: int, stop: int) -> list[np.ndarray]:
        # slicing the first axis of a C-contiguous array keeps it contiguous: onnxruntime writes through
        return [buffer[start:stop] for buffer in self.buffers]


def _ones_up_to(lengths: np.ndarray) -> np.ndarray:
    """The attention mask [rows, longest] with lengths[i] ones (then zeros) in row i."""
    return (np.arange(int(lengths.max()))[None] < lengths[:, None]).astype(np.int64)
