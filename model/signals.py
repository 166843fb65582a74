"""SIGINT and SIGTERM (Ctrl-C, a preempted VM, a scheduler) as requests to stop cleanly.

A signal is only recorded. The work stops at its next safe point: `raise_if_requested()`
between batches, files and phases, or the step boundary inside fit, where a backup is written.
From there errors.Interrupted runs the callers' clean-up (partial files removed, earlier output
kept) as any error does, and the entry point prints one line and exits 128 + the signal's number.

Never from the handler itself: Python runs it at whatever bytecode the main thread is at, often
inside TensorFlow or Keras, and an exception raised there has aborted the process (heap
corruption while a tf.data iterator was being made) and come out of Keras re-wrapped as another
error (BUILD_NOTES: "Signals stop at safe points"). A second signal of the same kind stops the
process at once, as if no handler were installed: a user who presses Ctrl-C twice means it, and
atomic writes leave whole files or none.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from model.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)

_active: StopRequests | None = None


class StopRequests:
    def __init__(self):
        self.signum: int | None = None

    def handle(self, signum, frame) -> None:
        self.signum = signum
        signal.signal(signum, signal.SIG_DFL)  # the second one stops the process at once

    def raise_if_requested(self) -> None:
        if self.signum is not None:
            raise Interrupted(self.signum)


def raise_if_requested() -> None:
    """A safe point: raises errors.Interrupted if a stop was requested inside stop_requests()."""
    if _active is not None:
        _active.raise_if_requested()


@contextlib.contextmanager
def stop_requests():
    """Handlers for SIGINT and SIGTERM while the block runs (the main thread only: Python
    delivers signals there); the earlier handlers come back after. A request still pending when
    the block ends normally is dropped: the work it would have stopped is complete."""
    global _active
    requests = StopRequests()
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    previous = {signum: signal.signal(signum, requests.handle) for signum in SIGNALS}
    outer, _active = _active, requests
    try:
        yield requests
    finally:
        _active = outer
        for signum, handler in previous.items():
            signal.signal(signum, handler)
