"""The generation worker behind `lmspec serve`: one thread owns the model and runs requests in a
running batch that they join and leave between decode steps (serve/running_batch.py); each request's
events go back to it on its own asyncio event loop. StaticScheduler, the batch-at-a-time worker it
replaced, stays as `--batching static`, the baseline bench/serve.py measures against."""
from __future__ import annotations

import asyncio
import itertools
import logging
import queue
import threading
import time
from collections import deque
from dataclasses import dataclass

from lmspec.runtime.serve.language_model import OnnxModel
from lmspec.runtime.serve.requests import GenerationRequest, TokenEvent
from lmspec.runtime.serve.running_batch import RunningBatch
from lmspec.runtime.serve.slot_batch import SlotBatch

log = logging.getLogger("uvicorn.error")

IDLE_POLL = 0.5  # seconds an idle worker waits on the queue before it looks at the drain deadline again


def running_batch_for(model: OnnxModel, capacity: int) -> RunningBatch | SlotBatch:
    """The running batch a bundle wants: slots in a shared buffer for a fused-attention export, else
    cohorts of padded rows; `capacity` is the most rows it will be given."""
    return SlotBatch(model, capacity) if model.shared_buffer else RunningBatch(model)


class Ticket:
    """One HTTP request's generations (one per prompt): the worker sends (choice, TokenEvent) pairs,
    or (choice, exception) when generation failed, to `events` on the request's event loop.

    Sent items wait in an outbox that one scheduled callback empties: when the worker produces
    events faster than the loop takes them, the loop wakes once for many rather than once per token,
    and the two threads contend less for the GIL (for a small model, that contention had cost about
    as much time as the generation itself)."""

    def __init__(self, loop: asyncio.AbstractEventLoop):
        self.loop = loop
        self.events: asyncio.Queue = asyncio.Queue()
        self.cancelled = False  # the client went away: nothing more to send, nothing left to run
        self._outbox: list = []
        self._lock = threading.Lock()
        self._scheduled = False

    def send(self, choice: int, item: TokenEvent | Exception) -> None:
        if self.cancelled:
            return
        with self._lock:
            self._outbox.append((choice, item))
            if self._scheduled:
                return
            self._scheduled = True
        try:
            self.loop.call_soon_threadsafe(self._deliver)
        except RuntimeError:  # the loop is closed: the server is shutting down
            self.cancelled = True

    def _deliver(self) -> None:  # on the event loop
        with self._lock:
            items, self._outbox, self._scheduled = self._outbox, [], False
        for item in items:
            self.events.put_nowait(item)


class RequestTimedOut(Exception):
    """The request ran past --request-timeout: it was stopped where it was."""


class ServerClosing(Exception):
    """The server is shutting down and its time to drain (--drain-seconds) is over."""


@dataclass(eq=False)
class Job:
    ticket: Ticket
    choice: int
    request: GenerationRequest
    deadline: float = float("inf")  # time.monotonic() after which it is stopped


class Scheduler:
    """The worker thread that owns the model. Between two decode steps it takes newly queued jobs
    into the running batch (up to `max_batch` rows), and drops rows whose client went away, whose
    time is up, or, once the server's drain is over, every row."""

    def __init__(self, model: OnnxModel, max_batch: int, request_timeout: float | None = None):
        self.model, self.max_batch, self.request_timeout = model, max_batch, request_timeout
        self.queue: queue.Queue[Job | None] = queue.Queue()  # None asks the worker to stop
        self.thread = threading.Thread(target=self._work, name="lmspec-generate", daemon=True)
        self.batch = running_batch_for(model, max_batch)
        self.waiting: deque[Job] = deque()  # taken from the queue, not yet in the batch (it is full)
        self.running: dict[int, Job] = {}  # a row's index -> its job
        self.steps = 0
        self.closing_at: float | None = None  # set by drain(): when the remaining jobs are failed
        self.observe_batch = None  # called with the batch's size at each step (the /metrics histogram)
        self._numbers = itertools.count()  # rows' indices, never reused

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

    def drain(self, seconds: float) -> None:
        """Let what runs or waits finish for up to `seconds`; after that, fail it (ServerClosing).
        Called from a signal handler: it only sets a time, which the worker reads at its next step
        (an idle worker looks at least every IDLE_POLL seconds)."""
        self.closing_at = time.monotonic() + seconds

    def queued(self) -> int:
        return self.queue.qsize() + len(self.waiting)

    def health(self) -> dict:
        return {"queued": self.queued(), "running": len(self.batch), "steps": self.steps}

    def submit(self, ticket: Ticket, requests: list[GenerationRequest]) -> None:
        deadline = time.monotonic() + self.request_timeout if self.request_timeout else float("inf")
        for choice, request in enumerate(requests):
            self.queue.put(Job(ticket, choice, request, deadline))

    def _work(self) -> None:
        while self._take_queued():
            self._drop_abandoned()
            self._admit()
            self._step()
        for job in [*self.waiting, *self.running.values()]:
            job.ticket.send(job.choice, ServerClosing("the server stopped"))

    def _take_queued(self) -> bool:
        """Move queued jobs to `waiting`, blocking only when there is nothing else to do; False once
        asked to stop."""
        block = not len(self.batch) and not self.waiting
        while True:
            try:
                job = self.queue.get(timeout=IDLE_POLL) if block else self.queue.get_nowait()
            except queue.Empty:
                return True
            if job is None:
                return False
            self.waiting.append(job)
            block = False

    def _drop_abandoned(self) -> None:
        now = time.monotonic()
        closed = self.closing_at is not None and now >= self.closing_at

        def reason(job: Job) -> Exception | None:
            if closed:
                return ServerClosing("the server is shutting down and could not finish this request in time")
            if now >= job.deadline:
                return RequestTimedOut(f"the request ran past this server's limit of {self.request_timeout:g} s")
            return None

        kept = deque()
        for job in self.waiting:
            if job.ticket.cancelled:
                continue
            if (err := reason(job)) is not None:
                job.ticket.send(job.choice, err)
            else:
                kept.append(job)
        self.waiting = kept
        gone = set()
        for row in self.batch.rows:
            job = self.running[row.index]
            if job.ticket.cancelled:
                gone.add(row)
            elif (err := reason(job)) is not None:
                job.ticket.send(job.choice, err)
                gone.add(row)
        if gone:
            for row in gone:
                del self.running[row.index]
            self.batch.discard(gone)

    def _admit(self) -> None:
        joining = []
        while self.waiting and len(self.batch) + len(joining) < self.max_batch:
            job = self.waiting.popleft()
            row = self.model.new_row(next(self._numbers), job.request)
            self.running[row.index] = job
            joining.append(row)
        if joining:
            self._deliver(lambda: self.batch.join(joining), joining)

    def _step(self) -> None:
        if not len(self.batch):
            return
        self.steps += 1
        if self.observe_batch is not None:
            self.observe_batch(len(self.batch))
        self._deliver(self.batch.step, list(self.batch.rows))

    def _deliver(self, produce, rows) -> None:
        """Send the events `produce()` makes to their jobs; if it fails, fail the rows it ran for."""
        try:
            events = produce()
        except Exception as err:  # a bug or an onnxruntime failure: fail the rows it touched, keep serving
            log.exception("generation failed for %d request(s)", len(rows))
            for row in self.batch.clear() + rows:  # the shared cache may be half-updated: start afresh
                job = self.running.pop(row.index, None)
                if job is not None:
                    job.ticket.send(job.choice, err)
            return
        for event in events:
            job = self.running[event.index]
            job.ticket.send(job.choice, event)
            if event.finish_reason is not None:
                del self.running[event.index]


class StaticScheduler:
    """Today's baseline: takes up to `max_batch` queued jobs and runs them together until every one
    of them has finished; a job that arrives meanwhile waits for the next batch."""

    def __init__(self, model: OnnxModel, max_batch: int, request_timeout: float | None = None):
        self.model, self.max_batch = model, max_batch
        self.queue: queue.Queue[Job | None] = queue.Queue()
        self.thread = threading.Thread(target=self._work, name="lmspec-generate", daemon=True)
        self.steps = 0
        self.observe_batch = None

    start, stop = Scheduler.start, Scheduler.stop

    def queued(self) -> int:
        return self.queue.qsize()

    def health(self) -> dict:
        return {"queued": self.queued(), "steps": self.steps}

    def drain(self, seconds: float) -> None:
        """No draining here: the baseline only needs to be measured."""

    def submit(self, ticket: Ticket, requests: list[GenerationRequest]) -> None:
        for choice, request in enumerate(requests):
            self.queue.put(Job(ticket, choice, request))

    def _work(self) -> None:
        while (batch := self._next_batch()) is not None:
            if batch:
                self._run(batch)

    def _next_batch(self) -> list[Job] | None:
        first = self.queue.get()
        if first is None:
            return None
        batch = [first]
        while len(batch) < self.max_batch:
            try:
                job = self.queue.get_nowait()
            except queue.Empty:
                break
            if job is None:
                self.queue.put(None)  # run this batch, then stop
                break
            batch.append(job)
        return [job for job in batch if not job.ticket.cancelled]

    def _run(self, batch: list[Job]) -> None:
        self.steps += 1
        if self.observe_batch is not None:
            self.observe_batch(len(batch))
        finished: set[int] = set()
        try:
            for event in self.model.stream([job.request for job in batch]):
                job = batch[event.index]
                job.ticket.send(job.choice, event)
                if event.finish_reason is not None:
                    finished.add(event.index)
                if all(job.ticket.cancelled for job in batch):
                    break  # no one is listening any more: free the worker for the next batch
        except Exception as err:  # a bug or an onnxruntime failure: fail this batch, keep serving
            log.exception("generation failed for a batch of %d", len(batch))
            for i, job in enumerate(batch):
                if i not in finished:
                    job.ticket.send(job.choice, err)
