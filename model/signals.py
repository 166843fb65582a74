"""SIGINT and SIGTERM (Ctrl-C, a preempted VM, a scheduler) as requests to stop cleanly.

While a request is `deferred` (the train loop inside fit) a signal is only recorded, and the
loop stops at the next step boundary with a backup; otherwise it raises errors.Interrupted at
once, and the callers' clean-up (partial files removed, earlier output kept) runs as for any
error. Either way the entry point prints one line and exits 128 + the signal's number.
"""

from __future__ import annotations

import contextlib
import signal
import threading

from model.errors import Interrupted

SIGNALS = (signal.SIGINT, signal.SIGTERM)


class StopRequests:
    def __init__(self):
        self.signum: int | None = None
        self.deferred = False

    def handle(self, signum, frame) -> None:
        self.signum = signum
        if not self.deferred:
            raise Interrupted(signum)


@contextlib.contextmanager
def stop_requests():
    """Handlers for SIGINT and SIGTERM while the block runs (the main thread only: Python
    delivers signals there); the earlier handlers come back after."""
    requests = StopRequests()
    if threading.current_thread() is not threading.main_thread():
        yield requests
        return
    previous = {signum: signal.signal(signum, requests.handle) for signum in SIGNALS}
    try:
        yield requests
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler)
