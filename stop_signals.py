"""SIGINT and SIGTERM (Ctrl-C, a preempted VM, a scheduler) as requests to stop: the one mechanism
of both halves. `model/signals.py` and `beam_convert/stopping.py` apply it, each with its own error.

While `stop_requests(error)` runs, the handler records the signal (`received()`), and the work ends
by raising `error(signum)`; its command prints one line and exits 128 + the signal's number
(`exit_status`: 130 for SIGINT, 143 for SIGTERM). Where the error is raised is the one choice:

- At safe points (the model side: train, evaluate). The handler only records; the work calls
  `raise_if_requested()` between batches, files and phases. Python runs a handler at whatever
  bytecode the main thread is at, often inside TensorFlow or Keras, and an exception raised
  there has aborted the process and come out of Keras re-wrapped as another error (BUILD_NOTES:
  "Signals stop at safe points"). A second signal of the same kind stops the process at once,
  as if no handler were installed: a user who presses Ctrl-C twice means it.
- At once (`at_once=True`, the converter). Its main thread only waits for Beam's runner, with no
  safe point of ours to reach, so the handler raises there. Beam wraps what a DoFn raises (a
  KeyboardInterrupt comes out as "RuntimeError: KeyboardInterrupt [while running ...]"), so what
  the run does next is decided from the record (`received()`), not from the exception that
  reaches it. A second signal is ignored: the first one's stop (well under a second) is putting
  the earlier output back.

Only the main thread can set handlers (Python delivers signals there): elsewhere the block
records nothing. The earlier handlers come back when the block ends; a request still pending
then is dropped, the work it would have stopped being complete.

Free of both halves, as record_schema is: each imports it, it imports neither.
"""

from __future__ import annotations

import contextlib
import signal
import threading
from typing import Callable, Iterator, Optional

SIGNALS = (signal.SIGINT, signal.SIGTERM)


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name


def exit_status(signum: int) -> int:
    return 128 + signum


class StopRequests:
    """What a block has received: `signum`, None until a signal comes; `error(signum)` is raised
    at the next `raise_if_requested()`, or by the handler itself when `at_once`."""

    def __init__(self, error: Callable[[int], BaseException], *, at_once: bool = False):
        self.error = error
        self.at_once = at_once
        self.signum: Optional[int] = None

    def handle(self, signum, frame) -> None:
        if not self.at_once:
            self.signum = signum
            signal.signal(signum, signal.SIG_DFL)  # the second one stops the process at once
        elif self.signum is None:  # at once: a second signal finds the first one's stop under way
            self.signum = signum
            raise self.error(signum)

    def raise_if_requested(self) -> None:
        if self.signum is not None:
            raise self.error(self.signum)


_active: Optional[StopRequests] = None


def received() -> Optional[int]:
    """The stop signal that arrived during the innermost stop_requests() block, if one did."""
    return _active.signum if _active is not None else None


def raise_if_requested() -> None:
    """A safe point: raises the active block's error if a stop was requested (a no-op outside one)."""
    if _active is not None:
        _active.raise_if_requested()


@contextlib.contextmanager
def stop_requests(error: Callable[[int], BaseException], *, at_once: bool = False) -> Iterator[StopRequests]:
    """SIGINT and SIGTERM are requests to stop, ended by `error` (see the module's docstring), for
    the duration of the block."""
    global _active
    requests = StopRequests(error, at_once=at_once)
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
