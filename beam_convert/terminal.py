"""What the terminal shows: the converter's own `beam_convert:` lines, nothing else unless --verbose.

  say             one line of the converter's own
  progress_lines  products done and products/s every PROGRESS_SECONDS, read from the workers' markers
  quiet Beam      Beam's log lines: errors only (show_beam_logs), and during a local run everything
                  written to file descriptor 2, worker processes included, goes to _tmp-KEY/beam.log
                  (stderr_to)
  one_line        the one line a user needs from an exception, however often Beam wrapped it
"""

import contextlib
import json
import logging
import os
import re
import sys
import threading
import time
import traceback
from typing import Iterator, Optional

from beam_convert import files
from beam_convert.errors import NothingConverted
from beam_convert.job import INDEX_MARKER, RANGE_MARKER, progress_marker

PROGRESS_SECONDS = 10.0
BEAM_LOG = "beam.log"  # in the job's tmp folder: what Beam and its workers print, unless --verbose
DRAIN_SECONDS = 2.0  # how long the end of a run waits for the last of Beam's lines to reach BEAM_LOG


def say(message: str) -> None:
    print(f"beam_convert: {message}", file=sys.stderr, flush=True)


# --- progress ------------------------------------------------------------------------------------

class Progress(threading.Thread):
    """Prints products done and products/s from the marker files that workers leave in tmp_dir."""

    def __init__(self, tmp_dir: str):
        super().__init__(daemon=True)
        self.tmp_dir = tmp_dir
        self.stop = threading.Event()
        self.started = time.monotonic()
        # The highest counts seen: the markers vanish with tmp_dir once the output is in place.
        self.total = self.done = 0

    def _read(self, kind: str) -> list[dict]:
        found = []
        for path in files.glob(progress_marker(self.tmp_dir, kind)):
            try:
                found.append(json.loads(files.read_bytes(path)))
            except (OSError, ValueError):
                pass  # being written
        return found

    def run(self) -> None:
        while not self.stop.wait(PROGRESS_SECONDS):
            self.total = max(self.total, sum(entry["documents"] for entry in self._read(INDEX_MARKER)))
            self.done = max(self.done, sum(entry["documents"] for entry in self._read(RANGE_MARKER)))
            elapsed = time.monotonic() - self.started
            share = f" of {self.total:,} ({100 * self.done / self.total:.0f}%)" if self.total else " (indexing)"
            say(f"{self.done:,} products{share}, {self.done / elapsed:,.0f} products/s, {elapsed:.0f} s")


@contextlib.contextmanager
def progress_lines(tmp_dir: str, enabled: bool) -> Iterator[None]:
    if not enabled:
        yield
        return
    progress = Progress(tmp_dir)
    progress.start()
    try:
        yield
    finally:
        progress.stop.set()
        progress.join()  # before stderr is put back: it may be printing to it


# --- Beam's own output ---------------------------------------------------------------------------

def _is_not_corrupt_bson(record: logging.LogRecord) -> bool:
    # Beam logs a worker's exception with its traceback before re-raising it; for a corrupt
    # document the one line that main() prints says all there is to say.
    return "CorruptBsonError" not in record.getMessage()


def quiet_beam_logs() -> None:
    """Beam's log lines: errors only until the options are read (show_beam_logs), and no traceback
    of a corrupt document."""
    logging.getLogger("apache_beam").setLevel(logging.ERROR)
    logging.getLogger("apache_beam.runners.common").addFilter(_is_not_corrupt_bson)


def show_beam_logs(verbose: bool) -> None:
    """Beam's own log lines: all with --verbose, else errors only (and those go to the run's log)."""
    if verbose:
        logging.basicConfig()  # a handler for them, if Beam's import did not already make one
    logging.getLogger("apache_beam").setLevel(logging.INFO if verbose else logging.ERROR)


def beam_log_path(tmp_dir: str) -> str:
    """Where Beam's output goes during a quiet local run: the job's tmp folder (deleted with it on
    success, kept for a look after a failure); dropped when that folder is not local."""
    return os.path.join(tmp_dir, BEAM_LOG) if files.FileSystems.get_scheme(tmp_dir) is None else os.devnull


def _writes_to_fd(stream, fd: int) -> bool:
    try:
        return stream.fileno() == fd
    except (AttributeError, OSError, ValueError):  # pytest's capture, StringIO: no descriptor
        return False


class _LogDrain(threading.Thread):
    """Copies what arrives on a pipe into log_path, and drops what cannot be written there.

    Descriptor 2 points at the pipe rather than at the file: a write to a full disk fails, and
    Beam's worker prints a failed bundle's traceback to stderr before it answers the runner, so a
    failing print there leaves the runner waiting for ever. A pipe that is always drained never
    fails a write.
    """

    def __init__(self, read_end: int, log_path: str):
        super().__init__(daemon=True)
        self.read_end = read_end
        self.log_path = log_path

    def run(self) -> None:
        try:
            log = os.open(self.log_path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        except OSError:
            log = None
        try:
            while data := os.read(self.read_end, 65536):  # b"": every writer has closed its end
                if log is not None:
                    try:
                        os.write(log, data)
                    except OSError:
                        pass  # a full disk: Beam's lines are lost, the run goes on to its own error
        finally:
            os.close(self.read_end)
            if log is not None:
                os.close(log)


def _thread_exception_to_fd2(args) -> None:
    """threading.excepthook during a quiet run: a Beam thread's uncaught exception (its worker
    process gone) goes where Beam's other output goes, not to the terminal through sys.stderr."""
    if issubclass(args.exc_type, SystemExit):
        return
    text = "".join(traceback.format_exception(args.exc_type, args.exc_value, args.exc_traceback))
    name = args.thread.name if args.thread is not None else "?"
    try:
        os.write(2, f"Exception in thread {name}:\n{text}".encode("utf-8", "backslashreplace"))
    except OSError:
        pass


@contextlib.contextmanager
def stderr_to(log_path: str) -> Iterator[None]:
    """Points file descriptor 2 at log_path for the duration (through a pipe, _LogDrain);
    sys.stderr keeps the terminal.

    The FnApiRunner's worker processes inherit descriptor 2 and set up their own logging: INFO
    lines from the start (before any option could lower it) and no pipeline options at all, so
    `--default_sdk_harness_log_level` never reaches them. The descriptor is the one handle on what
    they print. This process's Beam logging handler also writes to descriptor 2 (it holds the
    original sys.stderr), so it follows; the converter's own lines go to a duplicate of the
    terminal through the replaced sys.stderr.
    """
    sys.stderr.flush()
    # A log line that cannot be written is dropped: by default the logging module prints
    # "--- Logging error ---" and a traceback to the terminal for each one.
    raise_exceptions, logging.raiseExceptions = logging.raiseExceptions, False
    thread_hook, threading.excepthook = threading.excepthook, _thread_exception_to_fd2
    terminal = os.dup(2)
    read_end, write_end = os.pipe()
    drain = _LogDrain(read_end, log_path)
    drain.start()
    original = sys.stderr
    if _writes_to_fd(original, 2):
        sys.stderr = open(os.dup(terminal), "w", buffering=1, encoding=original.encoding, errors="backslashreplace")
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        logging.raiseExceptions = raise_exceptions
        threading.excepthook = thread_hook
        original.flush()
        os.dup2(terminal, 2)  # closes this process's last write end of the pipe
        os.close(terminal)
        # Worker processes that are still exiting hold their own; what they print after this is lost.
        drain.join(timeout=DRAIN_SECONDS)
        if sys.stderr is not original:
            sys.stderr.close()
            sys.stderr = original


# --- one-line errors -----------------------------------------------------------------------------

_CORRUPT = re.compile(r"(\S+: corrupt BSON document at byte offset \d+: [^\n]+?)\s*(?:'|\"|\[|\n|$)")
# A worker process's exception reaches this process as text ending with the traceback's last line,
# "module.NothingConverted: MESSAGE [while running 'STAGE']".
_NOTHING_CONVERTED = re.compile(rf"^(?:[\w.]+\.)?{NothingConverted.__name__}: (.+?)(?: \[while running [^\]]*\])?$",
                                re.MULTILINE)
_WHILE_RUNNING = re.compile(r" \[while running [^\]]*\]$")
# An OSError naming its file, as str() gives it (files.naming adds the name to a failed write):
# "[Errno 28] No space left on device: '/out/_tmp-KEY/records/train/00000-000000000000000.tfrecord'".
_OS_ERROR = re.compile(r"\[Errno \d+\] ([^\[\]\n]+?): '([^'\n]+)'")


def corrupt_bson_message(error: BaseException) -> Optional[str]:
    """The CorruptBsonError message inside an exception that Beam may have wrapped several times."""
    match = _CORRUPT.search(str(error))
    return match.group(1) if match else None


def nothing_converted_message(error: BaseException) -> Optional[str]:
    """The NothingConverted message, raised here (in-process runner) or in a worker process."""
    if isinstance(error, NothingConverted):
        return _WHILE_RUNNING.sub("", str(error).strip())
    matches = _NOTHING_CONVERTED.findall(str(error))
    return matches[-1] if matches else None


def os_error_message(error: BaseException) -> Optional[str]:
    """"PATH: REASON" of an OSError with a file name, raised here or in a worker process."""
    if isinstance(error, OSError) and error.filename and error.strerror:
        return f"{error.filename}: {error.strerror}"
    matches = _OS_ERROR.findall(str(error))
    return f"{matches[-1][1]}: {matches[-1][0]}" if matches else None


def one_line(error: BaseException) -> str:
    """The message a user needs from an exception."""
    known = corrupt_bson_message(error) or nothing_converted_message(error) or os_error_message(error)
    if known:
        return known
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return f"{type(error).__name__}: {lines[-1] if lines else ''}"[:1000]
