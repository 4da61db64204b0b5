"""The language-model server's Prometheus metrics, at GET /metrics: requests by route and status,
their latency, prompt and generated tokens, the queue's depth and the batches' sizes. Each app has
its own registry, so that several servers in one process (the tests) count apart."""
from __future__ import annotations

import time

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

LATENCY_BUCKETS = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)


class ServerMetrics:
    def __init__(self, queue_depth, max_batch: int):
        self.registry = CollectorRegistry()
        r = self.registry
        self.requests = Counter("lmspec_requests", "HTTP requests answered", ["route", "status"], registry=r)
        self.latency = Histogram("lmspec_request_seconds", "Seconds from a request's arrival to the end of its answer "
                                 "(the last event of a stream)", ["route"], buckets=LATENCY_BUCKETS, registry=r)
        self.prompt_tokens = Counter("lmspec_prompt_tokens", "Prompt tokens of the requests run", registry=r)
        self.generation_tokens = Counter("lmspec_generation_tokens", "Tokens generated", registry=r)
        Gauge("lmspec_queue_depth", "Requests waiting for the model", registry=r).set_function(queue_depth)
        buckets = sorted({2 ** k for k in range(max_batch.bit_length() + 1) if 2 ** k <= max_batch} | {max_batch})
        self.batch_size = Histogram("lmspec_batch_size", "Requests generated together in one batch",
                                    buckets=buckets, registry=r)

    def exposition(self) -> tuple[bytes, str]:
        """The text format Prometheus scrapes, and its content type."""
        return generate_latest(self.registry), CONTENT_TYPE_LATEST

    def measured(self, app):
        """`app` with every HTTP request counted by route and status and timed to the end of its body."""
        async def measure(scope, receive, send):
            if scope["type"] != "http":
                return await app(scope, receive, send)
            started, status = time.perf_counter(), [500]

            async def watched(message):
                if message["type"] == "http.response.start":
                    status[0] = message["status"]
                await send(message)
                if message["type"] == "http.response.body" and not message.get("more_body", False):
                    self._count(scope, status[0], started)
                    status.append("counted")

            try:
                await app(scope, receive, watched)
            finally:
                if "counted" not in status:  # the client left mid-answer
                    self._count(scope, status[0], started)
        return measure

    def _count(self, scope, status: int, started: float) -> None:
        route = scope.get("route")
        path = getattr(route, "path", None) or "other"  # unknown paths share one label: no label per typo
        self.requests.labels(path, str(status)).inc()
        self.latency.labels(path).observe(time.perf_counter() - started)
