"""The tf.data service on localhost for the tests and the benchmarks: free ports, and
`python -m model.data_service dispatcher|worker` processes started, waited for (their ready line),
stopped and cleaned up.

Used by tests/test_model_data_service.py and bench/data_service_benchmark.py (as tests.launchers:
run from the repository's root, as both are).
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
COMMAND = [sys.executable, "-m", "model.data_service"]


def free_ports(count: int, host: str = "localhost") -> list[int]:
    """`count` distinct ports nothing listens on now (all held open until all are found)."""
    sockets = [socket.socket() for _ in range(count)]
    try:
        for s in sockets:
            s.bind((host, 0))
        return [s.getsockname()[1] for s in sockets]
    finally:
        for s in sockets:
            s.close()


def free_port(host: str = "localhost") -> int:
    return free_ports(1, host)[0]


def process_cpu(pid: int) -> float:
    """User + system CPU seconds of a process (all its threads), from /proc."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class NotReady(RuntimeError):
    """A launched process did not print the awaited line in time (or exited first)."""


class Launched:
    """One `python -m model.data_service ARGS` process. Its stdout and stderr lines are collected
    by threads (`lines`, `errors`), so a full pipe never blocks it. Usable as a context manager:
    killed on exit."""

    def __init__(self, *args: str, env: dict | None = None, cwd: str = REPO):
        # TensorFlow's C++ INFO lines would bury the launcher's own; a caller's env wins.
        env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"} if env is None else env
        self.args = list(args)
        self.process = subprocess.Popen([*COMMAND, *args], cwd=cwd, env=env, stdout=subprocess.PIPE,
                                        stderr=subprocess.PIPE, text=True)
        self.lines: list[str] = []
        self.errors: list[str] = []
        self._threads = [threading.Thread(target=self._read, args=(pipe, out), daemon=True)
                         for pipe, out in ((self.process.stdout, self.lines), (self.process.stderr, self.errors))]
        for thread in self._threads:
            thread.start()

    @staticmethod
    def _read(pipe, out):
        for line in pipe:
            out.append(line.rstrip("\n"))

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for(self, text: str, timeout: float = 90) -> str:
        """The first stdout line holding `text`; NotReady after `timeout` s or once the process has
        exited without it (with its output in the message)."""
        deadline = time.time() + timeout
        while time.time() < deadline:
            for line in list(self.lines):
                if text in line:
                    return line
            if self.process.poll() is not None:
                time.sleep(0.2)  # the last lines
                for line in list(self.lines):
                    if text in line:
                        return line
                break
            time.sleep(0.1)
        raise NotReady(f"no {text!r} from {self.process.args} (exit code {self.process.poll()}): "
                       f"stdout {self.lines}, stderr {self.errors[-20:]}")

    def signal(self, sig) -> None:
        if self.process.poll() is None:
            self.process.send_signal(sig)

    def finish(self, timeout: float = 30) -> int:
        """Waits for the process to end; its exit code (negative: the signal that ended it)."""
        code = self.process.wait(timeout=timeout)
        for thread in self._threads:
            thread.join(timeout=5)
        return code

    def kill(self) -> None:
        self.signal(signal.SIGKILL)
        self.finish()

    def stop(self, timeout: float = 20) -> int:
        """SIGTERM (a clean stop), SIGKILL if it is still there after `timeout` s."""
        self.signal(signal.SIGTERM)
        try:
            return self.finish(timeout)
        except subprocess.TimeoutExpired:
            self.kill()
            return self.process.returncode

    def cpu(self) -> float:
        return process_cpu(self.pid)

    def __enter__(self) -> "Launched":
        return self

    def __exit__(self, *exc) -> None:
        self.kill()


def _ready(launched: Launched, text: str, timeout: float) -> Launched:
    try:
        launched.wait_for(text, timeout)
    except BaseException:
        launched.kill()
        raise
    return launched


class Service:
    """A dispatcher on a free port and `workers` workers, on localhost. With work_root, the
    dispatcher journals under work_root/dispatcher-PORT (fault tolerant: it can be restarted on
    the same port). close() kills everything (also the processes started later through it)."""

    def __init__(self, workers: int, *, work_root: str | None = None, timeout: float = 90):
        self.port = free_port()
        self.address = f"localhost:{self.port}"
        self.target = f"grpc://{self.address}"
        self.work_dir = os.path.join(work_root, f"dispatcher-{self.port}") if work_root else ""
        self.timeout = timeout
        self.launched: list[Launched] = []
        try:
            self.dispatcher = self.start_dispatcher()
            # Started together, then waited for: their start-ups overlap.
            self.workers = [self.start_worker(wait=False) for _ in range(workers)]
            for launched in self.workers:
                _ready(launched, "worker ready", timeout)
        except BaseException:
            self.close()
            raise

    def start_dispatcher(self) -> Launched:
        """The dispatcher (again, after a kill: same port, same work_dir, so it replays its journal)."""
        launched = Launched("dispatcher", f"--port={self.port}",
                            *([f"--work_dir={self.work_dir}"] if self.work_dir else []))
        self.launched.append(launched)
        return _ready(launched, "dispatcher ready", self.timeout)

    def start_worker(self, wait: bool = True) -> Launched:
        launched = Launched("worker", f"--dispatcher={self.address}")
        self.launched.append(launched)
        return _ready(launched, "worker ready", self.timeout) if wait else launched

    def cpu(self) -> float:
        """CPU seconds of the dispatcher and the workers so far."""
        return sum(launched.cpu() for launched in (self.dispatcher, *self.workers))

    def stop(self) -> None:
        """A clean stop: workers first, then the dispatcher (SIGTERM, SIGKILL after 20 s)."""
        for launched in reversed(self.launched):
            launched.stop()

    def close(self) -> None:
        """Everything killed at once."""
        for launched in self.launched:
            launched.signal(signal.SIGKILL)
        for launched in self.launched:
            launched.finish()

    def __enter__(self) -> "Service":
        return self

    def __exit__(self, *exc) -> None:
        self.close()
