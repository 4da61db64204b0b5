"""Ctrl-C held back while a run's logs are written, and raised once they are whole.

A KeyboardInterrupt can land anywhere in Python code: halfway through a metrics record, inside the
plot's atomic write, or just after a lock was taken and before the `with` that releases it begins.
TensorBoard's event writer takes a lock, and its queue's mutex, on every write and flush; left taken,
closing the writer on the way out would wait for it forever. Inside `interrupt_after()` a Ctrl-C is
only noted, and raised as KeyboardInterrupt when the block ends.
"""
from __future__ import annotations

import signal
import threading
from contextlib import contextmanager


@contextmanager
def interrupt_after():
    """Run the block with SIGINT noted rather than raised; raise KeyboardInterrupt after it if one came.
    Outside the main thread (where Python delivers signals) or under another SIGINT handler, it does
    nothing."""
    if threading.current_thread() is not threading.main_thread() \
            or signal.getsignal(signal.SIGINT) is not signal.default_int_handler:
        yield
        return
    noted = []
    signal.signal(signal.SIGINT, lambda number, frame: noted.append(number))
    try:
        yield
    finally:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    if noted:
        raise KeyboardInterrupt
