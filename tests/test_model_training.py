"""train.py and model.training.loop: flags, flagfiles, two workers in step, steps per execution.

Two CPU devices (MirroredStrategy) are in test_model_training_resume.py.

The run killed and resumed, and what it leaves, is in test_model_training_run.py.

The data is the real sample BSON written as records with record_schema in a plain loop, so these
tests do not depend on the converter. Everything runs the tiny backbone on 32x32 images.
"""

import glob
import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

from tests.record_helpers import REPO, TINY_TRAIN_FLAGS as TINY, write_data_dir

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data_dir(str(tmp_path_factory.mktemp("data")))


def test_bad_flags_fail_at_start_with_one_line(data_dir, tmp_path):
    model_dir = tmp_path / "m"
    base = [f"--data_dir={data_dir}", f"--model_dir={model_dir}"]
    cases = [
        (["--model_dir=/tmp/x"], "--data_dir"),
        ([*base, "--fusion=median"], "--fusion=median: value should be one of"),
        ([*base, "--batch_size=7", "--cpu_devices=2"], "--batch_size=7 is not divisible by the 2 replicas: use a multiple of 2"),
        ([f"--data_dir={tmp_path}", f"--model_dir={model_dir}"], "--data_dir has no metadata.json"),
    ]
    # Concurrently: each one pays a TensorFlow import, nothing more.
    running = [subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for args, _ in cases]
    for (args, message), process in zip(cases, running):
        _, stderr = process.communicate(timeout=120)
        assert process.returncode != 0, args
        assert [line for line in stderr.splitlines() if message in line], (args, stderr[-2000:])
        assert "Traceback" not in stderr, args
    assert not model_dir.exists()  # nothing written before the flags are right


@pytest.mark.parametrize("flagfile", ["configs/cpu_tiny.flags", "configs/xception_gpu.flags"])
def test_config_flagfiles_parse(flagfile, data_dir, tmp_path):
    """Every line of the shipped configurations is a valid flag of train.py (parsed in-process)."""
    from absl import flags

    import train

    values = flags.FlagValues()
    for flag in train.FLAGS.get_flags_for_module(train):
        values[flag.name] = flag  # the same Flag objects, in a registry of their own
    values(["train.py", f"--flagfile={os.path.join(REPO, flagfile)}", f"--data_dir={data_dir}",
            f"--model_dir={tmp_path}", "--epochs=2"])
    assert values.epochs == 2  # flags after --flagfile override it
    assert values.batch_size % 8 == 0 if "gpu" in flagfile else values.backbone == "tiny"


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_workers(data_dir, model_dir, trace_dir, seconds_per_step):
    """Two train.py processes on this host with TF_CONFIG (tests/slow_train.py, each tracing its
    batches): MultiWorkerMirroredStrategy over gRPC, as across hosts."""
    cluster = {"worker": [f"localhost:{port}" for port in _free_ports(2)]}
    workers = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        workers.append(subprocess.Popen(
            [sys.executable, "tests/slow_train.py", str(seconds_per_step), f"--data_dir={data_dir}",
             f"--model_dir={model_dir}", *TINY, "--epochs=2", "--steps_per_epoch=3", "--fusion=mean_max",
             "--seed=5", "--deterministic", "--backup_every_steps=1"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "TF_CONFIG": tf_config, "TF_CPP_MIN_LOG_LEVEL": "2",
                 "TRACE_BATCHES": os.path.join(trace_dir, f"worker_{index}.txt")}))
    return workers


def _finish(workers):
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
        assert "2 replicas: 1 here on CPU (MultiWorkerMirroredStrategy)" in output
    return outputs


def _trace(trace_dir):
    """{(worker, batch): product ids} of the batches the workers' streams made."""
    made = {}
    for index in range(2):
        with open(os.path.join(trace_dir, f"worker_{index}.txt")) as f:
            for line in f:
                pipeline, batch, ids = line.split()
                assert int(pipeline) == index  # each worker reads its own share
                made.setdefault((index, int(batch)), set()).add(ids)
    return made


def test_two_workers_keep_in_step_and_resume_as_an_uninterrupted_run(data_dir, tmp_path):
    """Synchronous training: both workers end with the same weights; the chief owns model_dir,
    the other writes under model_dir/workers/. Killed inside epoch 2 (SIGKILL, both) and resumed,
    each worker trains on its uninterrupted twin's batches and the chief ends bit-identical."""
    import keras

    import model.network.multi_image  # noqa: F401  (registers the custom layers for load_model)

    runs = {}
    for name in ("uninterrupted", "resumed"):
        (tmp_path / name).mkdir()
        runs[name] = (tmp_path / name / "model", str(tmp_path / name))
    model_dir, trace_dir = runs["uninterrupted"]
    for output in _finish(_start_workers(data_dir, model_dir, trace_dir, 0)):
        assert "Done: 2 epochs, 6 optimizer steps" in output
    chief = keras.saving.load_model(model_dir / "model.keras")
    other = keras.saving.load_model(model_dir / "workers" / "worker_1" / "model.keras")
    assert len(chief.trainable_weights) == len(other.trainable_weights) > 0
    for a, b in zip(chief.trainable_weights, other.trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    assert (model_dir / "export" / "saved_model.pb").exists()

    model_dir, trace_dir = runs["resumed"]
    workers = _start_workers(data_dir, model_dir, trace_dir, 0.5)
    progress = model_dir / "backup" / "progress.json"
    deadline = time.time() + 240
    while time.time() < deadline and not (progress.exists() and json.loads(progress.read_text() or "{}").get(
            "optimizer_step", 0) >= 4):
        time.sleep(0.05)
    for worker in workers:
        worker.kill()
        worker.communicate(timeout=30)
    step = json.loads(progress.read_text())["optimizer_step"]
    assert 4 <= step < 6, step  # inside epoch 2
    for output in _finish(_start_workers(data_dir, model_dir, trace_dir, 0)):
        assert f"Resuming from {model_dir}/backup: epoch 2/2, optimizer step {step}" in output

    made, seen = _trace(runs["uninterrupted"][1]), _trace(trace_dir)
    trained = {key: ids for key, ids in seen.items() if key[1] < 6}  # 6 steps, one batch each (read ahead: more)
    assert {batch for _, batch in trained} == set(range(6))
    assert all(ids == made[key] and len(ids) == 1 for key, ids in trained.items())
    for a, b in zip(keras.saving.load_model(runs["uninterrupted"][0] / "model.keras").get_weights(),
                    keras.saving.load_model(model_dir / "model.keras").get_weights()):
        np.testing.assert_array_equal(a, b)


def test_steps_per_execution_keeps_steps_scalars_profile_and_throughput_in_optimizer_steps(data_dir, tmp_path, capsys):
    """steps_per_execution=2 with an epoch of 5 steps: the epoch is rounded to 4 (Keras would run 6),
    step scalars land every 2 optimizer steps, the profile covers optimizer steps 3-5, and
    products/s is a number."""
    from model import config as config_lib
    from model.training import loop

    model_dir = tmp_path / "m"
    config = config_lib.TrainConfig(
        data_dir=data_dir, model_dir=str(model_dir), backbone="tiny", image_size=32, batch_size=8, epochs=2,
        steps_per_epoch=5, steps_per_execution=2, log_every_steps=2, profile_batches="3,5", sample_products=0,
        bn_recalibration_steps=1, validation_steps=1, fusion="mean")
    state = loop.train(config)
    out = capsys.readouterr().out
    assert "steps_per_epoch rounded down from 5 to 4, a multiple of steps_per_execution=2" in out
    assert state["steps_per_epoch"] == 4 and state["optimizer_iterations"] == 8
    assert np.isfinite(state["final"]["products_per_second"]) and state["final"]["products_per_second"] > 0

    points = {}
    for path in glob.glob(str(model_dir / "logs" / "train_steps" / "*tfevents*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                points.setdefault(value.tag, []).append(event.step)
    assert {"step_loss", "step_category_top1", "step_learning_rate", "step_products_per_second"} <= set(points)
    assert points["step_loss"] == [4, 6, 8]  # every 2 steps after the first execution (tracing)

    first, last = (int(s) for s in out.split("Profiled optimizer steps ")[1].split(" ")[0].split("-"))
    assert first <= 3 and last >= 5 and last - first < 6
    [trace] = glob.glob(str(model_dir / "logs" / "train" / "plugins" / "profile" / "*" / "*.xplane.pb"))
    # A step marker per execution (of 2 steps), numbered by its first optimizer step.
    assert step_markers(trace) == list(range(first, last + 1, 2))


def step_markers(xplane_path):
    """step_num of the profiler's "train" step markers in a trace, in order."""
    from tensorflow.tsl.profiler.protobuf import xplane_pb2

    space = xplane_pb2.XSpace()
    with open(xplane_path, "rb") as f:
        space.ParseFromString(f.read())
    steps = []
    for plane in space.planes:
        stat_names = {key: meta.name for key, meta in plane.stat_metadata.items()}
        for line in plane.lines:
            for event in line.events:
                if plane.event_metadata[event.metadata_id].name == "train":
                    stats = {stat_names[s.metadata_id]: s.int64_value for s in event.stats}
                    steps.append(stats["step_num"])
    return sorted(steps)
