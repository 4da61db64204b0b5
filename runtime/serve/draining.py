"""uvicorn's server with a clean shutdown: on SIGTERM or Ctrl-C the app is told to drain before
uvicorn stops accepting connections and waits for the open ones."""
from __future__ import annotations

from collections.abc import Callable

import uvicorn


class DrainingServer(uvicorn.Server):
    """`drain(seconds)` makes the app refuse new requests (503) and end the running ones once `seconds`
    have passed (a stream with an error event and [DONE], a waiting call with a 503), so that uvicorn's
    grace period, a backstop here, never has to cancel a request mid-answer."""

    def __init__(self, config: uvicorn.Config, drain: Callable[[float], None] | None, seconds: float):
        super().__init__(config)
        self.drain, self.seconds = drain, seconds

    def handle_exit(self, sig, frame) -> None:
        if not self.should_exit and self.drain is not None:
            self.drain(self.seconds)
        super().handle_exit(sig, frame)
        # uvicorn re-raises the signal once it has shut down, so the process ends killed by it; a
        # drained shutdown is the normal end of a server: exit status 0.
        self._captured_signals.clear()
