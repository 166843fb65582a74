"""SIGINT and SIGTERM on the model side: stop requests that raise errors.Interrupted at safe points.

The mechanism is the one both halves use (stop_signals.py, at the top level: why a signal is only
recorded, and why a second one stops the process at once). A signal is recorded; the work stops at
its next safe point: `raise_if_requested()` between batches, files and phases, or the step boundary
inside fit, where a backup is written. From there errors.Interrupted runs the callers' clean-up
(partial files removed, earlier output kept) as any error does, and the entry point prints one line
and exits 128 + the signal's number.
"""

from __future__ import annotations

import contextlib
from typing import Iterator

import stop_signals
from model.errors import Interrupted

SIGNALS = stop_signals.SIGNALS
raise_if_requested = stop_signals.raise_if_requested  # a safe point


class StopRequests(stop_signals.StopRequests):
    """What stop_requests() yields, made by hand (the callbacks' tests): ended by errors.Interrupted
    at a safe point."""

    def __init__(self):
        super().__init__(Interrupted)


@contextlib.contextmanager
def stop_requests() -> Iterator[stop_signals.StopRequests]:
    """SIGINT and SIGTERM recorded while the block runs (the main thread only); the earlier
    handlers come back after, and a request still pending then is dropped."""
    with stop_signals.stop_requests(Interrupted) as requests:
        yield requests
