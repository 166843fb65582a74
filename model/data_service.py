"""Input beyond one host's CPUs (issue 12): the training pipeline on tf.data service workers.

Over 400 lines: the launchers with their fault handling (taken ports, unreachable dispatchers, SIGTERM) beside `distribute`, the one function trainers call.

    python -m model.data_service dispatcher --port=5050 [--work_dir=DIR]
    python -m model.data_service worker --dispatcher=HOST:5050 [--port=PORT] [--worker_address=HOST:PORT]
    python train.py ... --data_service=grpc://HOST:5050

TensorFlow's own servers run underneath (tf.data.experimental.service.DispatchServer and
WorkerServer). The trainer registers its training dataset (the `create_dataset` graph: read,
parse, decode, crop, batch) with the dispatcher; the workers run that graph and stream finished
batches to the trainer, which reads the same elements the local pipeline yields: decoded uint8
image stacks at the crop size, the mask, the ids and labels. Everything after `distribute` (the
one-hot targets, the prefetch) stays on the trainer, as do validation, evaluate.py, the sample
grid and the BatchNorm recalibration: they read little and would gain nothing. Workers need no
project code, only the same TensorFlow (the graph is self-contained), but they need the data:
the file names in the graph are the trainer's, so trainers and workers must see the data folder
at the same path (gs://, or a shared filesystem).

Processing mode: dynamic sharding (ShardingPolicy.DYNAMIC, the default here)
----------------------------------------------------------------------------
The dispatcher hands out the training files one at a time ("splits") to whichever worker asks;
each worker interleaves the files it holds, shuffles records and batches. Across all workers each
training file is read once per pass of the data, workers of different speeds each do what they
can, workers can join or leave mid-run, and epochs mean what they mean locally. `ShardingPolicy.OFF`
(`processing_mode="off"`) has every worker produce the whole stream: with N workers every product
comes N times a pass, and with an int `--seed` the workers' streams are identical (the same seeded
graph), so every batch would arrive N times; it is there for unsplittable datasets, with seed=None.

Dynamic sharding splits the *first source* of the graph, the file list, and runs everything after
it on the workers. Two parts of `create_dataset`'s local structure then go wrong (measured while
building this, 5 files and 2 workers): the file-level `shuffle(len(files))` fills its buffer with
every file name before it yields one, so the first worker to start takes every file of the pass
and the others idle (a worker that dies takes the whole pass with it); and `repeat()` on the
workers gives each worker repetitions of its own: a worker that joins late finds its first
repetition spent and produces nothing. So the pipeline to distribute starts with `file_splits`:
a splittable index stream mapped to file names through a seeded permutation per pass
(`tf.random.experimental.index_shuffle`). The order is decided where the splits are made, every
pass is a new permutation of all files, and with repeat=True the stream is endless: one job for
the whole run, no drained pipelines and no dropped short batch at pass boundaries (as the local
file-level repeat). `create_dataset(..., dynamic_sharding=True)` is that structure; without it
`distribute` still streams, with the two faults above.

Effect on epochs, shuffling and --seed:
  * Epochs. A Keras epoch stays `steps_per_epoch` steps of the endless stream, and a pass of the
    data is still every training file once (in `file_splits` order, each file read by one
    worker). Passes overlap at their boundaries by what the workers hold: up to 16 open files
    each (the interleave), their shuffle buffers and batches in flight; locally it is 16 files.
    Every replica and every trainer reads one shared job (first come, first served), so the
    batches of a step come from one pass, not from one copy of the data per replica.
  * Shuffling. File order: a new permutation every pass. Records: each worker shuffles its own
    records, in its own `shuffle_buffer`, across the files it holds; which worker gets which file
    depends on timing. Balance holds whatever the file count (a worker that asks gets the next
    file, of the next pass if need be); the ~700 train shards of the Cdiscount conversion keep
    passes from overlapping much up to ~40 workers.
  * --seed orders the files of every pass and nothing else: which worker reads a file, the
    interleaving and the record shuffle depend on timing, so batches are not reproducible under
    the service, whatever the seed. Each worker's record shuffle and crop offsets draw their own
    numbers: one seed would give every worker the same random stream (the graph is the same) and
    the k-th batch of every worker the same crop offsets. The registered dataset is marked
    non-deterministic, so no stage waits to keep an order that is lost anyway.

Faults (tests/test_data_service.py):
  * A worker that dies (SIGKILL) loses what it held: its open files' remaining records and the
    batches in its buffers are skipped for that pass, never repeated (TensorFlow's at-most-once
    visitation under dynamic sharding). The trainer keeps reading from the other workers at once.
    The dispatcher keeps listing a dead worker (`registered_workers`; `live_workers` probes them).
    A worker started again, or a new one, joins the running job and takes the next files.
  * The dispatcher killed and restarted with the same --port and --work_dir replays its journal
    (datasets, jobs, the split cursor): the trainer reads what the workers had buffered, waits a
    few seconds (~5 s here) while the workers re-register, and goes on. Without --work_dir the
    restarted dispatcher knows no job and the trainer's input fails with NotFoundError.
  * A trainer started before the dispatcher or before any worker waits and says so, at once and
    every 30 s (`wait_for_workers`; registering a dataset with an unreachable dispatcher blocks
    inside TensorFlow without a word, so train.py calls it before building the dataset), and
    `watch_workers` says when the number of live workers changes during training.

What goes over the wire (bench/RESULTS_data_service.md): a 4-slot stack is 4 x 160 x 160 x 3 =
307 KB a product at 160 px crops whatever the product's image count, 2.35x the real pixels at
the catalogue's 1.7 images a product. `distribute(pack=True)` (the default) sends the real images
only and rebuilds the padded stack on the trainer with one gather (the exact local pixels); on
2 cores that took the service from 0.37-0.47x to 0.63x the local pipeline's products/s.
`compression="AUTO"` (the default) snappy-compresses each element on the worker: the real
sample's photographs (white backgrounds) halve (103 -> 52 KB a packed product), the synthetic
data's noisy textures do not compress at all; it costs ~2 ms of worker CPU a batch. At 3,000
images/s a GPU that is ~230 MB/s (1.8 Gbit/s) uncompressed, ~120 MB/s with AUTO on real photos.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import os
import random
import signal
import socket
import sys
import tempfile
import threading
import time

PROTOCOL = "grpc"
DEFAULT_DISPATCHER_PORT = 5050
PROCESSING_MODES = ("dynamic", "off")
COMPRESSIONS = ("AUTO", None)
REPORT_EVERY = 30.0  # seconds between two "still waiting" lines
_DISPATCHER_SERVICE = "/tensorflow.data.DispatcherService/"
_PREFIX = "data_service:"


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
                log(f"{_PREFIX} {len(workers)} worker(s) at grpc://{address} after {waited:.0f} s; starting")
            return workers
        if timeout is not None and waited >= timeout:
            raise TimeoutError(f"{_PREFIX} gave up after {waited:.0f} s: {problem}")
        if last_report is None or time.monotonic() - last_report >= report_every:
            log(f"{_PREFIX} waiting for grpc://{address} ({waited:.0f} s): {problem}")
            last_report = time.monotonic()
        time.sleep(poll)


def watch_workers(service: str, *, poll: float = 10.0, report_every: float = REPORT_EVERY, log=None) -> threading.Event:
    """A daemon thread that prints a line when the number of live workers changes, and
    every `report_every` seconds while there is none or the dispatcher does not answer (training
    then runs on what is buffered, then waits). Set the returned event to stop it."""
    address = parse_service(service)
    log = log or _say
    stop = threading.Event()

    def run():
        known, last_report = None, 0.0
        while not stop.wait(poll):
            try:
                count, problem = len(live_workers(address)), None
            except ServiceError as error:
                count, problem = None, str(error)
            if count == 0:
                problem = "no worker up: training waits for input"
            now = time.monotonic()
            if count != known and count is not None and known is not None:
                log(f"{_PREFIX} {count} worker(s) up at grpc://{address} (was {known})")
            if problem and (count != known or now - last_report >= report_every):
                log(f"{_PREFIX} {problem}")
                last_report = now
            known = count

    threading.Thread(target=run, name="data_service_watch", daemon=True).start()
    return stop


# ---------------------------------------------------------------------------------------------
# The training side


def job_name_for(*settings) -> str:
    """A job name that every replica and every trainer of one run computes alike, and that differs
    for another run or other data settings: consumers that share a job name share its stream, and
    TensorFlow joins a name to the job already running under it whatever dataset is registered.
    Pass the run's model_dir as given on the command line and the settings that shape a batch
    (data_dir, image/crop size, per-replica batch, seed, shuffle buffer)."""
    digest = hashlib.sha1(json.dumps(settings, default=str, sort_keys=True).encode()).hexdigest()
    return f"cdiscount-train-{digest[:16]}"


def file_splits(files, *, seed: int | None, repeat: bool):
    """The split source for dynamic sharding: a dataset of file names, every file once per pass in
    a new seeded order each pass, endless when repeat (else one pass).

    A `Dataset.range` (splittable: the dispatcher hands out one index per request) mapped on the
    worker to `files[permutation_p(k mod n)]` for pass p = k div n, the permutation drawn by
    `tf.random.experimental.index_shuffle` from [seed, p]. Stateless, so the dispatcher's cursor
    alone says which files are taken, and no worker buffers more names than its interleave reads.
    seed=None draws one now (Python's `random.SystemRandom`)."""
    import tensorflow as tf

    names = tf.constant(list(files), tf.string)
    count = int(names.shape[0])
    if count < 1:
        raise ValueError("file_splits needs at least one file")
    if seed is None:
        seed = random.SystemRandom().getrandbits(62)
    seed = tf.constant(int(seed), tf.int64)
    total = (1 << 62) if repeat else count  # 2^62 splits: endless for any run

    def name(k):
        position, passes = k % count, k // count
        index = tf.random.experimental.index_shuffle(position, tf.stack([seed, passes]), max_index=count - 1)
        return tf.gather(names, index)

    return tf.data.Dataset.range(total).map(tf.autograph.experimental.do_not_convert(name))


def distribute(dataset, service: str, *, job_name: str, processing_mode: str = "dynamic",
               compression: str | None = "AUTO", pack: bool = True,
               max_outstanding_requests: int | None = None):
    """`dataset` (a training pipeline, e.g. create_dataset(..., training=True, repeat=True,
    dynamic_sharding=True)) produced by the service's workers and read here.

    service: "grpc://HOST:PORT" (or "HOST:PORT") of the dispatcher.
    job_name: shared by every consumer of one training run (all replicas, all trainers): they
        read one job, first come first served; see `job_name_for`.
    processing_mode: "dynamic" (ShardingPolicy.DYNAMIC: the dataset's first source, the file
        list, is split across the workers, each file read once per pass) or "off" (every worker
        produces the whole dataset; only for unsplittable datasets, with seed=None).
    compression: "AUTO" (TensorFlow snappy-compresses elements on the worker) or None.
    pack: for elements `({"images": [B, M, S, S, 3], "mask": [B, M], ...}, label)`, send only the
        real images (the slots whose mask is > 0) and put the padded stack back together here:
        at 1.7 images a product, 4 slots are 2.35x the pixels. The elements read here are the
        dataset's, exactly. Other element structures go as they are.
    max_outstanding_requests: cap on elements requested at once (memory: that many batches);
        None lets tf.data tune it.

    The dataset is registered with the dispatcher when this is called (it must be reachable:
    call `wait_for_workers` first) and marked non-deterministic: under the service the order
    depends on which worker serves first anyway, so no stage should wait to keep one.
    """
    import tensorflow as tf

    if processing_mode not in PROCESSING_MODES:
        raise ValueError(f"processing_mode must be one of {PROCESSING_MODES}, got {processing_mode!r}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"compression must be one of {COMPRESSIONS}, got {compression!r}")
    if not job_name:
        raise ValueError("distribute needs a job_name shared by the run's consumers (see job_name_for)")
    address = parse_service(service)
    policy = {"dynamic": tf.data.experimental.service.ShardingPolicy.DYNAMIC,
              "off": tf.data.experimental.service.ShardingPolicy.OFF}[processing_mode]
    spec = dataset.element_spec
    pack = pack and _packable(spec)
    if pack:
        dataset = dataset.map(_pack_images, num_parallel_calls=tf.data.AUTOTUNE)
    if dataset.options().deterministic is not False:
        options = tf.data.Options()
        options.deterministic = False
        dataset = dataset.with_options(options)
    remote = dataset.apply(tf.data.experimental.service.distribute(
        processing_mode=policy, service=f"{PROTOCOL}://{address}", job_name=job_name,
        compression=compression, max_outstanding_requests=max_outstanding_requests))
    if pack:
        images_spec = spec[0][IMAGES]
        unpack = tf.autograph.experimental.do_not_convert(lambda features, label: _unpack_images(features, label, images_spec))
        remote = remote.map(unpack, num_parallel_calls=tf.data.AUTOTUNE)
    return remote


IMAGES, MASK = "images", "mask"  # record_schema's feature names (not imported: the launchers stay light)


def _packable(spec) -> bool:
    if not (isinstance(spec, tuple) and len(spec) == 2 and isinstance(spec[0], dict)):
        return False
    images, mask = spec[0].get(IMAGES), spec[0].get(MASK)
    return (images is not None and mask is not None and images.shape.rank == 5 and mask.shape.rank == 2
            and images.shape[2:].is_fully_defined())


def _pack_images(features, label):
    """[B, M, S, S, 3] padded stack -> [N, S, S, 3], the real images in slot order (worker side)."""
    import tensorflow as tf

    images = features[IMAGES]
    real = tf.reshape(features[MASK] > 0, [-1])
    flat = tf.reshape(images, tf.concat([[-1], tf.shape(images)[2:]], 0))
    return {**features, IMAGES: tf.gather(flat, tf.where(real)[:, 0])}, label


def _unpack_images(features, label, images_spec):
    """The real images back into their slots, zeros elsewhere (trainer side): one gather from a
    pool whose element 0 is the zero image, as input_pipeline.decode_images writes the stack
    (a scatter_nd is ~8x slower on CPU)."""
    import tensorflow as tf

    mask = features[MASK]
    real = tf.reshape(mask > 0, [-1])
    side = images_spec.shape[2:].as_list()
    place = tf.where(real, tf.cumsum(tf.cast(real, tf.int32)), 0)  # a slot's element in the pool
    pool = tf.concat([tf.zeros([1, *side], images_spec.dtype), features[IMAGES]], 0)
    images = tf.reshape(tf.gather(pool, place), tf.concat([tf.shape(mask), side], 0))
    return {**features, IMAGES: tf.ensure_shape(images, images_spec.shape)}, label


# ---------------------------------------------------------------------------------------------
# The launchers


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
    print(f"{_PREFIX} {name} stopped", flush=True)
    return 0


def _fail(message: str, code: int = 1):
    print(f"{_PREFIX} error: {message}", file=sys.stderr, flush=True)
    return code


def run_dispatcher(port: int, work_dir: str = "") -> int:
    if _port_taken(port):
        return _fail(f"port {port} is taken (another dispatcher?): choose another --port")
    if work_dir and "://" not in work_dir:  # gs://... is TensorFlow's to create
        try:
            os.makedirs(work_dir, exist_ok=True)
        except OSError as error:
            return _fail(f"--work_dir={work_dir}: {error.strerror}")
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
        return _fail(f"dispatcher could not start on port {port} ({reason})")
    sys.stderr.write(log["text"])
    bound = server._server.bound_port()  # the port actually bound (--port=0 picks a free one)
    host = socket.gethostname()
    state = f"work_dir {work_dir}, fault tolerant" if work_dir else "no work_dir: a restart forgets its jobs"
    print(f"{_PREFIX} dispatcher ready at grpc://localhost:{bound} (workers: --dispatcher={host}:{bound}; "
          f"trainers: --data_service=grpc://{host}:{bound}; {state})", flush=True)
    return _serve_until_signalled(server, "dispatcher")


def run_worker(dispatcher: str, port: int = 0, worker_address: str = "", connect_timeout: float = 60.0) -> int:
    try:
        address = parse_service(dispatcher)
    except ValueError as error:
        return _fail(f"--dispatcher: {error}", 2)
    if _port_taken(port):
        return _fail(f"port {port} is taken: choose another --port (0 picks a free one)")
    # Is the dispatcher there? TensorFlow's worker would otherwise retry silently for an hour.
    # A refused connection fails at once, so ask again until connect_timeout: a worker may be
    # started together with its dispatcher, which takes a few seconds to come up.
    deadline = time.monotonic() + connect_timeout
    while True:
        try:
            registered_workers(address, timeout=max(1.0, min(5.0, deadline - time.monotonic())))
            break
        except ServiceError as error:
            if time.monotonic() >= deadline:
                return _fail(f"{error} for {connect_timeout:g} s: start it first (python -m model.data_service "
                             f"dispatcher --port={address.rpartition(':')[2]}), fix --dispatcher, or wait "
                             f"longer (--connect_timeout)")
            time.sleep(1.0)
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
        return _fail(f"worker could not be created ({str(failure).strip().splitlines()[0]})")
    # start() binds the port, then registers with the dispatcher, retrying for as long as it is
    # gone: bounded here, so that a dispatcher that vanished since the check is one line too.
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
        return _fail(f"worker could not start on port {port} ({reason})")
    if not outcome.get("ok"):
        print(f"{_PREFIX} error: worker could not register with dispatcher {address} within "
              f"{connect_timeout + 20:g} s", file=sys.stderr, flush=True)
        os._exit(1)  # the registering thread cannot be cancelled
    sys.stderr.write(log["text"])
    bound = server._server.bound_port()
    shown = worker_address.replace("%port%", str(bound))
    print(f"{_PREFIX} worker ready at {shown} (port {bound}), registered with dispatcher {address}", flush=True)
    return _serve_until_signalled(server, "worker")


def _define_flags():
    from absl import flags

    flags.DEFINE_integer("port", None, f"Port to listen on (dispatcher: default {DEFAULT_DISPATCHER_PORT}; "
                         "worker: default 0, a free port).", lower_bound=0, upper_bound=65535)
    flags.DEFINE_string("work_dir", "", "dispatcher: folder for its journal (datasets, jobs, split cursor). With "
                        "it the dispatcher is fault tolerant: restarted with the same --port and --work_dir, it "
                        "resumes its jobs.")
    flags.DEFINE_string("dispatcher", "", "worker: HOST:PORT (or grpc://HOST:PORT) of the dispatcher.")
    flags.DEFINE_string("worker_address", "", "worker: HOST:PORT that trainers use to reach this worker "
                        "(%port% stands for the bound port). Default: this host's name, or localhost when "
                        "the dispatcher is on localhost.")
    flags.DEFINE_float("connect_timeout", 60.0, "worker: seconds to wait for the dispatcher (it may be starting "
                       "too) before failing.",
                       lower_bound=0.1)
    return flags.FLAGS


USAGE = ("usage: python -m model.data_service dispatcher [--port=5050] [--work_dir=DIR] | "
         "worker --dispatcher=HOST:PORT [--port=PORT] [--worker_address=HOST:PORT]")


def main(argv) -> int:
    from absl import flags

    FLAGS = flags.FLAGS
    commands = argv[1:]
    if len(commands) != 1 or commands[0] not in ("dispatcher", "worker"):
        return _fail(f"expected one command, dispatcher or worker; got {' '.join(commands) or 'none'}. {USAGE}", 2)
    if commands[0] == "dispatcher":
        if FLAGS.dispatcher:
            return _fail("--dispatcher is a worker flag", 2)
        port = DEFAULT_DISPATCHER_PORT if FLAGS.port is None else FLAGS.port
        return run_dispatcher(port, FLAGS.work_dir)
    if not FLAGS.dispatcher:
        return _fail("worker needs --dispatcher=HOST:PORT", 2)
    if FLAGS.work_dir:
        return _fail("--work_dir is a dispatcher flag", 2)
    return run_worker(FLAGS.dispatcher, FLAGS.port or 0, FLAGS.worker_address, FLAGS.connect_timeout)


if __name__ == "__main__":
    from absl import app

    from model import cli

    cli.configure_environment()  # before TensorFlow loads: quiet C++ logs, the pooling allocator
    _define_flags()
    app.run(lambda argv: sys.exit(main(argv)))
