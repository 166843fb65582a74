"""The dispatcher and worker processes (`python -m model.data_service`): TensorFlow's own servers,
started with one-line errors for a taken port, an unreachable dispatcher, a failed start, and
stopped cleanly on SIGTERM or SIGINT."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import sys
import tempfile
import threading
import time

from model.data_service.probe import PREFIX, ServiceError, parse_service, registered_workers

DEFAULT_DISPATCHER_PORT = 5050


def _port_taken(port: int) -> bool:
    """Whether something listens on `port` (all interfaces), as gRPC would find when binding."""
    if port == 0:
        return False
    for family, host in ((socket.AF_INET, "0.0.0.0"), (socket.AF_INET6, "::")):
        try:
            probe = socket.socket(family, socket.SOCK_STREAM)
        except OSError:
            continue
        with probe:
            probe.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)  # TIME_WAIT is not "taken"
            try:
                probe.bind((host, port))
            except OSError as error:
                if error.errno in (98, 48, 10048):  # EADDRINUSE (Linux, macOS, Windows)
                    return True
    return False


@contextlib.contextmanager
def _captured_stderr():
    """TensorFlow's C++ log lines (fd 2) captured while a server starts: on failure the launcher
    prints its own one line, on success they are passed on."""
    sys.stderr.flush()
    saved = os.dup(2)
    with tempfile.TemporaryFile(mode="w+b") as capture:
        os.dup2(capture.fileno(), 2)
        box = {"text": ""}
        try:
            yield box
        finally:
            os.dup2(saved, 2)
            os.close(saved)
            capture.seek(0)
            box["text"] = capture.read().decode(errors="replace")


def _serve_until_signalled(server, name: str) -> int:
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    while not stop.wait(0.5):
        pass
    server.stop()
    print(f"{PREFIX} {name} stopped", flush=True)
    return 0


def fail(message: str, code: int = 1):
    print(f"{PREFIX} error: {message}", file=sys.stderr, flush=True)
    return code


def run_dispatcher(port: int, work_dir: str = "") -> int:
    if _port_taken(port):
        return fail(f"port {port} is taken (another dispatcher?): choose another --port")
    if work_dir and "://" not in work_dir:  # gs://... is TensorFlow's to create
        try:
            os.makedirs(work_dir, exist_ok=True)
        except OSError as error:
            return fail(f"--work_dir={work_dir}: {error.strerror}")
    import tensorflow as tf

    config = tf.data.experimental.service.DispatcherConfig(
        port=port, work_dir=work_dir or None, fault_tolerant_mode=bool(work_dir))
    with _captured_stderr() as log:
        try:
            server = tf.data.experimental.service.DispatchServer(config)
        except (RuntimeError, tf.errors.OpError) as error:
            server = error
    if isinstance(server, Exception):
        reason = "port taken" if "port" in log["text"].lower() else str(server).strip().splitlines()[0]
        return fail(f"dispatcher could not start on port {port} ({reason})")
    sys.stderr.write(log["text"])
    bound = server._server.bound_port()  # the port actually bound (--port=0 picks a free one)
    host = socket.gethostname()
    state = f"work_dir {work_dir}, fault tolerant" if work_dir else "no work_dir: a restart forgets its jobs"
    print(f"{PREFIX} dispatcher ready at grpc://localhost:{bound} (workers: --dispatcher={host}:{bound}; "
          f"trainers: --data_service=grpc://{host}:{bound}; {state})", flush=True)
    return _serve_until_signalled(server, "dispatcher")


def run_worker(dispatcher: str, port: int = 0, worker_address: str = "", connect_timeout: float = 60.0) -> int:
    try:
        address = parse_service(dispatcher)
    except ValueError as error:
        return fail(f"--dispatcher: {error}", 2)
    if _port_taken(port):
        return fail(f"port {port} is taken: choose another --port (0 picks a free one)")
    unreachable = _wait_for_dispatcher(address, connect_timeout)
    if unreachable is not None:
        return fail(unreachable)
    dispatcher_host = address.rpartition(":")[0]
    if not worker_address:
        # The address trainers will be told to read from: this host's name, unless the whole
        # service is on this machine.
        local = dispatcher_host in ("localhost", "127.0.0.1", "::1", "[::1]")
        worker_address = ("localhost" if local else socket.gethostname()) + ":%port%"
    import tensorflow as tf

    config = tf.data.experimental.service.WorkerConfig(
        dispatcher_address=address, worker_address=worker_address, port=port)
    with _captured_stderr() as log:
        try:
            server = tf.data.experimental.service.WorkerServer(config, start=False)
            failure = None
        except (RuntimeError, tf.errors.OpError) as error:
            failure = error
    if failure is not None:
        return fail(f"worker could not be created ({str(failure).strip().splitlines()[0]})")
    failed = _start_worker(server, address, port, connect_timeout)
    if failed is not None:
        return failed
    bound = server._server.bound_port()
    shown = worker_address.replace("%port%", str(bound))
    print(f"{PREFIX} worker ready at {shown} (port {bound}), registered with dispatcher {address}", flush=True)
    return _serve_until_signalled(server, "worker")


def _wait_for_dispatcher(address: str, connect_timeout: float) -> str | None:
    """None once the dispatcher answers, else the error line. TensorFlow's worker would otherwise
    retry silently for an hour. A refused connection fails at once, so ask again until
    connect_timeout: a worker may be started together with its dispatcher, which takes a few
    seconds to come up."""
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            registered_workers(address, timeout=max(1.0, min(5.0, deadline - time.monotonic())))
            return None
        except ServiceError as error:
            if time.monotonic() >= deadline:
                return (f"{error} for {connect_timeout:g} s: start it first (python -m model.data_service "
                        f"dispatcher --port={address.rpartition(':')[2]}), fix --dispatcher, or wait "
                        f"longer (--connect_timeout)")
            time.sleep(1.0)


def _start_worker(server, address: str, port: int, connect_timeout: float) -> int | None:
    """None once the worker is started and registered (its log lines passed on), else the exit code.

    start() binds the port, then registers with the dispatcher, retrying for as long as it is
    gone: bounded here, so that a dispatcher that vanished since the check is one line too."""
    outcome = {}

    def start():
        try:
            server.start()
            outcome["ok"] = True
        except Exception as error:  # noqa: BLE001 - reported below in one line
            outcome["error"] = error

    with _captured_stderr() as log:
        starter = threading.Thread(target=start, daemon=True)
        starter.start()
        starter.join(connect_timeout + 20)
    if "error" in outcome:
        reason = "port taken" if "port" in log["text"].lower() else str(outcome["error"]).strip().splitlines()[0]
        return fail(f"worker could not start on port {port} ({reason})")
    if not outcome.get("ok"):
        print(f"{PREFIX} error: worker could not register with dispatcher {address} within "
              f"{connect_timeout + 20:g} s", file=sys.stderr, flush=True)
        os._exit(1)  # the registering thread cannot be cancelled
    sys.stderr.write(log["text"])
    return None
