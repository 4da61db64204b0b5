"""Iteration-level batching over the KV cache: requests join a running batch between decode steps
and leave it as soon as they finish, so a short request never waits for a long one to end.

An exported model's cache is dense: a batch's rows are padded on the left to the longest of them
(an attention mask marks each row's real tokens, positions are counted from it), and every row pays
attention over the padding. Rows that join at different times have different lengths, so one batch
of them would spend most of its attention on padding. The running batch is therefore kept as
cohorts: the requests prefilled together start one, each cohort runs as one batch with its own
cache, and two cohorts are merged (the shorter padded on the left) once that padding costs less
than a forward call of its own (merge_slack), or when there are more than MAX_COHORTS. Within a
cohort, a leaving row is dropped and the columns no remaining row uses are cut from the left, so a
cohort's cache is always as long as its longest row. Each row keeps within the model's context: one
that reaches it ends with finish_reason "length" (the server never lets a request ask for more).

A bundle exported without a cache has no padding mask either: its rows then run one by one over
their last `context` tokens at every step, still joining and leaving between steps.
"""
from __future__ import annotations

import numpy as np

from lmspec.runtime.serve.language_model import OnnxModel, left_pad, positions_from_mask
from lmspec.runtime.serve.requests import Row, TokenEvent, end_at_context, first_events, logits_wanted

MAX_COHORTS = 6  # beyond this many, the two that waste the least padding together are merged


def merge_slack(model: OnnxModel) -> int:
    """Padding positions (rows x columns) worth one forward call. A call reads every weight once; a
    cached position costs about its keys' and values' bytes, read by attention and copied into the
    new cache, and a merge also copies both caches once and keeps its padding until rows leave. The
    factor 16 is measured: on a 2-core CPU the best slack was ~130 positions for a 6-layer 256-wide
    model, ~300 for a 12-layer 768-wide one, about weight bytes / (16 x cache bytes per position)."""
    per_position = model.cache_bytes_per_position
    return max(32, model.weight_bytes // (16 * per_position)) if per_position else 0


class Cohort:
    """Rows that run as one batch: their cache [rows, kv_heads, length, head_dim] per layer, padded on
    the left (a sliding-window layer's: only its last positions, OnnxModel.fit_cache), and its mask
    [rows, length]. Without a cache: each row's tokens so far."""

    def __init__(self, model: OnnxModel, rows: list[Row], past: list[np.ndarray], mask: np.ndarray | None,
                 ids: list[list[int]]):
        self.model, self.rows, self.past, self.mask, self.ids = model, rows, past, mask, ids

    @property
    def length(self) -> int:
        return 0 if self.mask is None else self.mask.shape[1]

    def lengths(self) -> list[int]:
        """Each row's tokens once its pending token is fed: the prompt and what it generated."""
        if self.mask is None:
            return [len(ids) + 1 for ids in self.ids]
        return [int(n) + 1 for n in self.mask.sum(axis=1)]

    def keep(self, indices: list[int]) -> None:
        """Keep only these rows, and cut the cache columns none of them uses."""
        if len(indices) == len(self.rows):
            return
        self.rows = [self.rows[i] for i in indices]
        if self.mask is None:
            self.ids = [self.ids[i] for i in indices]
            return
        if not indices:
            self.past, self.mask = [], np.zeros((0, 0), dtype=np.int64)
            return
        self.past = [p[indices] for p in self.past]
        self.mask = self.mask[indices]
        unused = int(np.argmax(self.mask.any(axis=0)))  # leading columns that are padding in every row
        if unused:
            self.mask = np.ascontiguousarray(self.mask[:, unused:])
            self.past = self.model.fit_cache(self.past, self.mask.shape[1])

    def absorb(self, other: Cohort) -> None:
        """Take `other`'s rows in, padding the shorter cache on the left."""
        self.rows += other.rows
        if self.mask is None:
            self.ids += other.ids
            return
        length = max(self.length, other.length)
        self.past = [np.concatenate([a, b]) for a, b in zip(self.model.fit_cache(self.past, length),
                                                             self.model.fit_cache(other.past, length))]
        self.mask = np.concatenate([_pad_left(self.mask, length), _pad_left(other.mask, length)])

    def padding_if_merged(self, other: Cohort) -> int:
        """The padding positions a merge would add: the shorter cohort's rows times the difference."""
        short = self if self.length <= other.length else other
        return len(short.rows) * abs(self.length - other.length)


class RunningBatch:
    """The rows being generated now, in cohorts."""

    def __init__(self, model: OnnxModel):
        self.model = model
        self.cohorts: list[Cohort] = []
        self.merge_slack = merge_slack(model)

    @property
    def rows(self) -> list[Row]:
        return [row for cohort in self.cohorts for row in cohort.rows]

    def __len__(self) -> int:
        return sum(len(c.rows) for c in self.cohorts)

    def join(self, rows: list[Row]) -> list[TokenEvent]:
        """Prefill `rows` together and add those that go on as a new cohort; return each one's first event."""
        prompts = [list(row.request.prompt_ids)[-self.model.context:] for row in rows]
        last = logits_wanted(rows)
        if self.model.uses_cache:
            ids, mask = left_pad(prompts, pad_id=0)
            logits, past = self.model.forward(ids, mask, last=last)
            every = [logits[i, -len(p):] for i, p in enumerate(prompts)]
        else:
            mask, past = None, []
            every = [self.model.forward(np.array([p], dtype=np.int64), last=last)[0][0] for p in prompts]
        events = first_events(self.model, rows, prompts, every)
        going_on = [i for i, row in enumerate(rows) if row.finish_reason is None]
        if going_on:
            self.cohorts.append(Cohort(self.model, [rows[i] for i in going_on], [p[going_on] for p in past],
                                       None if mask is None else mask[going_on], [prompts[i] for i in going_on]))
            self._merge()
        return events

    def step(self) -> list[TokenEvent]:
        """One decode step for every row: each one's next token, then the finished rows leave."""
        events = []
        for cohort in self.cohorts:
            full = [i for i, n in enumerate(cohort.lengths()) if n > self.model.context]
            for i in full:
                events.append(end_at_context(cohort.rows[i]))
            if full:
                cohort.keep([i for i in range(len(cohort.rows)) if i not in full])
            if cohort.rows:
                events += self._step(cohort)
            cohort.keep([i for i, row in enumerate(cohort.rows) if row.finish_reason is None])
        self.cohorts = [c for c in self.cohorts if c.rows]
        self._merge()
        return events

    def _step(self, cohort: Cohort) -> list[TokenEvent]:
        if self.model.uses_cache:
            column = np.array([[row.new[-1]] for row in cohort.rows], dtype=np.int64)
            cohort.mask = np.concatenate([cohort.mask, np.ones((len(cohort.rows), 1), dtype=np.int64)], axis=1)
            logits, cohort.past = self.model.forward(column, cohort.mask, positions_from_mask(cohort.mask)[:, -1:],
                                                     cohort.past)
            last = logits[:, -1]
        else:
            for ids, row in zip(cohort.ids, cohort.rows):
                ids.append(row.new[-1])
            last = [self.model.forward(np.array([ids[-self.model.context:]], dtype=np.int64), last=1)[0][0, -1]
                    for ids in cohort.ids]
        return [self.model.advance(row, last[i]) for i, row in enumerate(cohort.rows)]

    def discard(self, rows: set[Row]) -> None:
        """Drop these rows (their client gone, or their time up)."""
        for cohort in self.cohorts:
            cohort.keep([i for i, row in enumerate(cohort.rows) if row not in rows])
        self.cohorts = [c for c in self.cohorts if c.rows]

    def clear(self) -> list[Row]:
        rows, self.cohorts = self.rows, []
        return rows

    def _merge(self) -> None:
        """Merge cohorts whose lengths are close enough, and the closest while there are too many."""
        if not self.model.uses_cache:
            if len(self.cohorts) > 1:  # rows run one by one anyway: one cohort is simplest
                first, *rest = self.cohorts
                for other in rest:
                    first.absorb(other)
                self.cohorts = [first]
            return
        while len(self.cohorts) > 1:
            pairs = [(a.padding_if_merged(b), i, j) for i, a in enumerate(self.cohorts)
                     for j, b in enumerate(self.cohorts) if i < j]
            waste, i, j = min(pairs)
            if waste > self.merge_slack and len(self.cohorts) <= MAX_COHORTS:
                return
            self.cohorts[i].absorb(self.cohorts[j])
            del self.cohorts[j]


def _pad_left(mask: np.ndarray, length: int) -> np.ndarray:
    """`mask` [rows, columns] padded with zeros on the left to `length` columns."""
    missing = length - mask.shape[1]
    return mask if missing == 0 else np.pad(mask, [(0, 0), (missing, 0)])
