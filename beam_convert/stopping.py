"""SIGINT and SIGTERM: the run stops where it is, keeps its finished ranges, and says so in one line.

The handler records the signal, then raises Stopped in the main thread. Beam wraps what a DoFn
raises (a KeyboardInterrupt comes out as "RuntimeError: KeyboardInterrupt [while running ...]"),
so what the run does next is decided from the record (received()), not from the exception that
reaches it. Exit status 128 + the signal's number: 130 for SIGINT, 143 for SIGTERM.
"""

import contextlib
import signal
import threading
from typing import Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)
_received: Optional[int] = None


class Stopped(BaseException):
    """A stop signal arrived. A BaseException, so that no `except Exception` takes it for a failure
    and goes on; `message` is the line that says what was kept."""

    def __init__(self, signum: int, message: str = ""):
        self.signum = signum
        self.message = message or f"stopped by {signal_name(signum)}"
        super().__init__(self.message)

    @property
    def status(self) -> int:
        return exit_status(self.signum)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def exit_status(signum: int) -> int:
    return 128 + signum


def received() -> Optional[int]:
    """The stop signal that arrived during this run, if one did."""
    return _received


def _handler(signum: int, frame) -> None:
    global _received
    if _received is not None:
        return  # a second signal: the first one's stop is under way (it takes well under a second)
    _received = signum
    raise Stopped(signum)


@contextlib.contextmanager
def stop_on_signals() -> Iterator[None]:
    """SIGINT and SIGTERM raise Stopped for the duration; the earlier handlers come back after.
    Only the main thread can set handlers: elsewhere (a caller's thread) this does nothing.

    Once a stop has begun, an uncaught exception in another thread is not printed: those are the
    runner's threads failing as their worker processes go (Ctrl-C in a terminal signals the
    workers too), expected and no news.
    """
    global _received
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    _received = None
    previous = {signum: signal.signal(signum, _handler) for signum in SIGNALS}
    thread_hook = threading.excepthook

    def quiet_once_stopped(args) -> None:
        if _received is None:
            thread_hook(args)

    threading.excepthook = quiet_once_stopped
    try:
        yield
    finally:
        threading.excepthook = thread_hook
        for signum, handler in previous.items():
            signal.signal(signum, handler)
        _received = None
