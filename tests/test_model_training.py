"""train.py and model.training.loop: flags, flagfiles, two CPU devices, two workers in step, steps per execution.

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


def test_library_mirrored_two_cpu_devices_without_val_split(tmp_path, capsys):
    """loop.train called directly, MirroredStrategy over the 2 logical CPUs of conftest.py."""
    import keras

    from model import config as config_lib
    from model.training import loop

    data = write_data_dir(str(tmp_path / "noval"), with_val=False, one_level1=True)
    config = config_lib.TrainConfig(
        data_dir=data, model_dir=str(tmp_path / "m"), backbone="tiny", image_size=32, batch_size=8,
        epochs=1, steps_per_epoch=2, fusion="late", sample_products=0, cpu_devices=2, precision="mixed_bfloat16",
        bn_recalibration_steps=2,
    )
    try:
        state = loop.train(config)
        again = loop.train(config)  # a finished run is never started over
    finally:
        keras.config.set_dtype_policy("float32")  # the policy is global: leave it as found
    out = capsys.readouterr().out
    assert "2 replicas on CPU:0..1 (MirroredStrategy)" in out
    assert "No val split" in out and "training without validation" in out
    assert "Epoch 1/1" in out  # Keras alone prints nothing for a single epoch
    assert state["optimizer_iterations"] == 2 and again == state
    assert "already holds a finished run" in out
    # One level1 class: nothing to learn there, so no level1 head (level2 keeps its own).
    assert "No level1 head: labels.csv has one level1 class." in out
    outputs = keras.saving.load_model(tmp_path / "m" / "model.keras").output
    assert set(outputs) == {"category", "level2"}
    assert os.path.exists(tmp_path / "m" / "model.keras") and os.path.exists(tmp_path / "m" / "export")
    assert not os.path.exists(tmp_path / "m" / "best.keras")


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


def test_multi_worker_training_keeps_the_workers_in_step(data_dir, tmp_path):
    # Two train.py processes on this host with TF_CONFIG: MultiWorkerMirroredStrategy over gRPC,
    # as across hosts. Synchronous training: both end with the same trainable weights; the chief
    # owns model_dir, the other worker writes under model_dir/workers/.
    import keras

    import model.network.multi_image  # noqa: F401  (registers the custom layers for load_model)

    cluster = {"worker": [f"localhost:{port}" for port in _free_ports(2)]}
    model_dir = tmp_path / "model"
    workers = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        workers.append(subprocess.Popen(
            [sys.executable, "train.py", f"--data_dir={data_dir}", f"--model_dir={model_dir}", *TINY,
             "--epochs=2", "--steps_per_epoch=3", "--fusion=mean_max"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "TF_CONFIG": tf_config, "TF_CPP_MIN_LOG_LEVEL": "2"}))
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
        assert "2 replicas: 1 here on CPU (MultiWorkerMirroredStrategy)" in output
        assert "Done: 2 epochs, 6 optimizer steps" in output

    chief = keras.saving.load_model(model_dir / "model.keras")
    other = keras.saving.load_model(model_dir / "workers" / "worker_1" / "model.keras")
    assert len(chief.trainable_weights) == len(other.trainable_weights) > 0
    for a, b in zip(chief.trainable_weights, other.trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    assert (model_dir / "export" / "saved_model.pb").exists()


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
