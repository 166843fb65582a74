"""SIGINT and SIGTERM in the converter: the run stops where it is, keeps its finished ranges, and
says so in one line.

The mechanism is the one both halves use (stop_signals.py, at the top level), with the stop raised
at once: the main thread only waits for Beam's runner. The handler records the signal and raises
Stopped in the main thread; Beam wraps what a DoFn raises, so what the run does next is decided
from the record (`stop_signals.received()`), not from the exception that reaches it. Exit status
128 + the signal's number: 130 for SIGINT, 143 for SIGTERM.
"""

import contextlib
import threading
from typing import Iterator

import stop_signals


class Stopped(BaseException):
    """A stop signal arrived. A BaseException, so that no `except Exception` takes it for a failure
    and goes on; `message` is the line that says what was kept."""

    def __init__(self, signum: int, message: str = ""):
        self.signum = signum
        self.message = message or f"stopped by {stop_signals.signal_name(signum)}"
        super().__init__(self.message)

    @property
    def status(self) -> int:
        return stop_signals.exit_status(self.signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise Stopped for the duration; the earlier handlers come back after.
    Only the main thread can set handlers: elsewhere (a caller's thread) this does nothing.

    Once a stop has begun, an uncaught exception in another thread is not printed: those are the
    runner's threads failing as their worker processes go (Ctrl-C in a terminal signals the
    workers too), expected and no news.
    """
    with stop_signals.stop_requests(Stopped, at_once=True):
        if threading.current_thread() is not threading.main_thread():
            yield
            return
        thread_hook = threading.excepthook

        def quiet_once_stopped(args) -> None:
            if stop_signals.received() is None:
                thread_hook(args)

        threading.excepthook = quiet_once_stopped
        try:
            yield
        finally:
            threading.excepthook = thread_hook
