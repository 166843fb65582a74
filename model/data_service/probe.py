"""The dispatcher as a trainer or a launcher sees it: its address, its registered workers, which
of them answer, and a wait for the first one. Plain gRPC calls: no TensorFlow is loaded, so a
launcher or a trainer can ask before anything heavy starts (docs/DATA_SERVICE.md)."""

from __future__ import annotations

import threading
import time

PROTOCOL = "grpc"
REPORT_EVERY = 30.0  # seconds between two "still waiting" lines
_DISPATCHER_SERVICE = "/tensorflow.data.DispatcherService/"
PREFIX = "data_service:"


class ServiceError(Exception):
    """A problem with the service the user can fix (address, port, dispatcher down): one line."""


# ---------------------------------------------------------------------------------------------
# Addresses and the dispatcher's state (gRPC, no TensorFlow needed)


def parse_service(service: str) -> str:
    """"grpc://HOST:PORT" or "HOST:PORT" -> "HOST:PORT"; ValueError (one line) for anything else."""
    if not isinstance(service, str) or not service.strip():
        raise ValueError("the tf.data service address is empty: use grpc://HOST:PORT")
    address = service.strip()
    if "://" in address:
        protocol, address = address.split("://", 1)
        if protocol != PROTOCOL:
            raise ValueError(f"{service!r}: the tf.data service speaks {PROTOCOL}://, not {protocol}://")
    host, _, port = address.rpartition(":")
    if not host or not port.isdigit() or not 0 < int(port) < 65536 or "/" in address:
        raise ValueError(f"{service!r} is not a dispatcher address: use grpc://HOST:PORT (e.g. grpc://localhost:5050)")
    return address


def _say(line: str) -> None:
    print(line, flush=True)


def _call(address: str, method: str, timeout: float) -> bytes:
    """One unary call with an empty request to the dispatcher's gRPC service (raw bytes back)."""
    import grpc

    with grpc.insecure_channel(address) as channel:
        call = channel.unary_unary(_DISPATCHER_SERVICE + method, request_serializer=lambda x: x,
                                   response_deserializer=lambda x: x)
        return call(b"", timeout=timeout)


def _varint(data: bytes, i: int) -> tuple[int, int]:
    value = shift = 0
    while True:
        byte = data[i]
        value |= (byte & 0x7F) << shift
        i, shift = i + 1, shift + 7
        if not byte & 0x80:
            return value, i


def _fields(data: bytes):
    """(field number, value) of a protobuf message's fields; value is bytes for a length-delimited
    field, an int for a varint, None for the fixed-width ones (not needed here)."""
    i = 0
    while i < len(data):
        key, i = _varint(data, i)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, i = _varint(data, i)
        elif wire == 2:
            length, i = _varint(data, i)
            value, i = data[i:i + length], i + length
        elif wire in (1, 5):
            value, i = None, i + (8 if wire == 1 else 4)
        else:
            raise ValueError(f"unexpected protobuf wire type {wire}")
        yield number, value


def registered_workers(service: str, timeout: float = 5.0) -> list[str]:
    """Addresses of the workers registered with the dispatcher (GetWorkers: `repeated WorkerInfo
    workers = 1`, `string address = 1`, tensorflow/core/data/service/dispatcher.proto).

    ServiceError when the dispatcher does not answer within `timeout` seconds or is not one."""
    import grpc

    address = parse_service(service)
    try:
        reply = _call(address, "GetWorkers", timeout)
    except grpc.RpcError as error:
        code = error.code()
        if code == grpc.StatusCode.UNIMPLEMENTED:
            raise ServiceError(f"{address} answers but is not a tf.data service dispatcher") from None
        reason = f"no answer within {timeout:g} s" if code == grpc.StatusCode.DEADLINE_EXCEEDED else code.name.lower()
        raise ServiceError(f"dispatcher {address} unreachable ({reason})") from None
    workers = []
    for number, info in _fields(reply):
        if number == 1 and isinstance(info, bytes):
            workers.append(next((v.decode() for n, v in _fields(info) if n == 1 and isinstance(v, bytes)), "?"))
    return workers


def _answers(address: str, timeout: float) -> bool:
    import grpc

    with grpc.insecure_channel(address) as channel:
        try:
            grpc.channel_ready_future(channel).result(timeout=timeout)
            return True
        except grpc.FutureTimeoutError:
            return False


def live_workers(service: str, timeout: float = 5.0, probe_timeout: float = 2.0) -> list[str]:
    """The registered workers that accept a connection now. The dispatcher never forgets a worker
    (a dead one stays in GetWorkers), so each one is probed, all at once."""
    from concurrent.futures import ThreadPoolExecutor

    workers = registered_workers(service, timeout=timeout)
    if not workers:
        return []
    with ThreadPoolExecutor(max_workers=min(len(workers), 32)) as pool:
        alive = list(pool.map(lambda address: _answers(address, probe_timeout), workers))
    return [address for address, ok in zip(workers, alive) if ok]


def wait_for_workers(service: str, *, min_workers: int = 1, timeout: float | None = None,
                     report_every: float = REPORT_EVERY, poll: float = 1.0, log=None) -> list[str]:
    """Returns the live workers once there are `min_workers`; until then prints one line at
    once and another every `report_every` seconds (the dispatcher unreachable, or no worker yet).

    Call it before building the distributed dataset: registering a dataset with a dispatcher that
    is not there blocks inside TensorFlow without a word. timeout=None waits for ever (the lines
    say what is missing); else TimeoutError (one line) after `timeout` seconds."""
    address = parse_service(service)
    log = log or _say
    start = time.monotonic()
    last_report = None
    while True:
        try:
            workers = live_workers(address, timeout=min(5.0, max(poll, 1.0)))
            problem = None if len(workers) >= min_workers else (
                f"{len(workers)} of {min_workers} worker(s) up; start one with: "
                f"python -m model.data_service worker --dispatcher={address}")
        except ServiceError as error:
            workers, problem = [], f"{error}; start it with: python -m model.data_service dispatcher --port={address.rpartition(':')[2]}"
        waited = time.monotonic() - start
        if problem is None:
            if last_report is not None:
                log(f"{PREFIX} {len(workers)} worker(s) at grpc://{address} after {waited:.0f} s; starting")
            return workers
        if timeout is not None and waited >= timeout:
            raise TimeoutError(f"{PREFIX} gave up after {waited:.0f} s: {problem}")
        if last_report is None or time.monotonic() - last_report >= report_every:
            log(f"{PREFIX} waiting for grpc://{address} ({waited:.0f} s): {problem}")
            last_report = time.monotonic()
        time.sleep(poll)


def watch_workers(service: str, *, workers: int | None = None, poll: float = 10.0, report_every: float = REPORT_EVERY,
                  log=None) -> threading.Event:
    """A daemon thread that prints a line when the number of live workers changes (from
    `workers`, the count training started with), saying what a lost worker cost, and every
    `report_every` seconds while there is none or the dispatcher does not answer (training then
    runs on what is buffered, then waits). Set the returned event to stop it."""
    address = parse_service(service)
    log = log or _say
    stop = threading.Event()

    def run():
        known, last_report = workers, 0.0
        while not stop.wait(poll):
            try:
                count, problem = len(live_workers(address)), None
            except ServiceError as error:
                count, problem = None, str(error)
            if count == 0:
                problem = "no worker up: training waits for input"
            now = time.monotonic()
            if count != known and count is not None and known is not None:
                lost = (f": what the {known - count} lost worker(s) held (batches in their buffers, the rest of "
                        "their open files, up to 16 each) is skipped for this pass of the data, never repeated"
                        if count < known else "")
                log(f"{PREFIX} {count} worker(s) up at grpc://{address} (was {known}){lost}")
            if problem and (count != known or now - last_report >= report_every):
                log(f"{PREFIX} {problem}")
                last_report = now
            known = count

    threading.Thread(target=run, name="data_service_watch", daemon=True).start()
    return stop
