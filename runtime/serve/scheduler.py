"""The generation worker behind `lmspec serve`: one thread owns the model and runs queued
requests in batches; each request's events go back to it on its own asyncio event loop."""
from __future__ import annotations

import asyncio
import logging
import queue
import threading
from dataclasses import dataclass

from lmspec.runtime.serve.language_model import GenerationRequest, OnnxModel, TokenEvent

log = logging.getLogger("uvicorn.error")


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


@dataclass(eq=False)
class Job:
    ticket: Ticket
    choice: int
    request: GenerationRequest


class Scheduler:
    """The worker thread that owns the model and runs queued requests in batches of up to `max_batch`."""

    def __init__(self, model: OnnxModel, max_batch: int):
        self.model, self.max_batch = model, max_batch
        self.queue: queue.Queue[Job | None] = queue.Queue()  # None asks the worker to stop
        self.thread = threading.Thread(target=self._work, name="lmspec-generate", daemon=True)
        self.batches = 0
        self.observe_batch = None  # called with each batch's size (the /metrics histogram)

    def start(self) -> None:
        self.thread.start()

    def stop(self) -> None:
        self.queue.put(None)
        self.thread.join(timeout=10)

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
        self.batches += 1
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
