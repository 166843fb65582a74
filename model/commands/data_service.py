"""The tf.data service's processes: the training pipeline on other hosts' CPUs.

    python -m model.data_service dispatcher --port=5050 [--work_dir=DIR]
    python -m model.data_service worker --dispatcher=HOST:5050 [--port=PORT] [--worker_address=HOST:PORT]
    python train.py ... --data_service=grpc://HOST:5050

How it shards, shuffles and survives faults: docs/DATA_SERVICE.md.
"""

from model.data_service.launchers import DEFAULT_DISPATCHER_PORT, fail, run_dispatcher, run_worker


def define_flags():
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
    """The exit status (absl's app.run exits with it)."""
    from absl import flags

    FLAGS = flags.FLAGS
    commands = argv[1:]
    if len(commands) != 1 or commands[0] not in ("dispatcher", "worker"):
        return fail(f"expected one command, dispatcher or worker; got {' '.join(commands) or 'none'}. {USAGE}", 2)
    if commands[0] == "dispatcher":
        if FLAGS.dispatcher:
            return fail("--dispatcher is a worker flag", 2)
        port = DEFAULT_DISPATCHER_PORT if FLAGS.port is None else FLAGS.port
        return run_dispatcher(port, FLAGS.work_dir)
    if not FLAGS.dispatcher:
        return fail("worker needs --dispatcher=HOST:PORT", 2)
    if FLAGS.work_dir:
        return fail("--work_dir is a dispatcher flag", 2)
    return run_worker(FLAGS.dispatcher, FLAGS.port or 0, FLAGS.worker_address, FLAGS.connect_timeout)
