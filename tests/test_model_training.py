"""train.py and model.training.loop: flags, flagfiles, steps per execution.

Two CPU devices (MirroredStrategy) are in test_model_training_resume.py, two workers
(MultiWorkerMirroredStrategy) in test_model_training_multi_worker.py.

The run killed and resumed, and what it leaves, is in test_model_training_run.py.

The data is the real sample BSON written as records with record_schema in a plain loop, so these
tests do not depend on the converter. Everything runs the tiny backbone on 32x32 images.
"""

import glob
import os
import re
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

from tests.record_helpers import REPO

pytestmark = pytest.mark.slow


def test_bad_flags_fail_at_start_with_one_line(data_dir, tmp_path):
    """train.py's flags and checks in a registry of their own, in-process; one bad flag in a
    process, for what only it shows (README section 2: a non-zero exit, absl's line, no
    traceback, nothing written)."""
    from absl import flags

    from model.commands import train

    model_dir = tmp_path / "m"
    base = [f"--data_dir={data_dir}", f"--model_dir={model_dir}"]
    cases = [
        (["--model_dir=/tmp/x"], "--data_dir"),
        ([*base, "--fusion=median"], "--fusion=median: value should be one of"),
        ([*base, "--batch_size=7", "--cpu_devices=2"], "--batch_size=7 is not divisible by the 2 replicas: use a multiple of 2"),
        ([f"--data_dir={tmp_path}", f"--model_dir={model_dir}"], "--data_dir has no metadata.json"),
    ]
    for args, message in cases:
        values = flags.FlagValues()
        train.define_flags(values)
        with pytest.raises(flags.Error, match=re.escape(message)):
            values(["train.py", *args])
    bad_fusion, message = cases[1]
    process = subprocess.run([sys.executable, "train.py", *bad_fusion], cwd=REPO, capture_output=True, text=True,
                             timeout=120)
    assert process.returncode == 1 and "Traceback" not in process.stderr
    assert [line for line in process.stderr.splitlines() if message in line], process.stderr[-2000:]
    assert not model_dir.exists()  # nothing written before the flags are right


@pytest.mark.parametrize("flagfile", ["configs/cpu_tiny.flags", "configs/xception_gpu.flags"])
def test_config_flagfiles_parse(flagfile, data_dir, tmp_path):
    """Every line of the shipped configurations is a valid flag of train.py (parsed in-process)."""
    from absl import flags

    from model import cli, config
    from model.commands import train

    values = flags.FlagValues()  # train.py's flags, in a registry of their own
    cli.define_flags(config.TrainConfig, train, flag_values=values)
    values(["train.py", f"--flagfile={os.path.join(REPO, flagfile)}", f"--data_dir={data_dir}",
            f"--model_dir={tmp_path}", "--epochs=2"])
    assert values.epochs == 2  # flags after --flagfile override it
    assert values.batch_size % 8 == 0 if "gpu" in flagfile else values.backbone == "tiny"


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
        bn_recalibration_steps=1, validation_steps=1, fusion="mean", input_check=False)
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
