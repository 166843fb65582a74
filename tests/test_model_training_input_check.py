"""Does the input keep up? The start line's verdict and the step_input_wait scalar, on a normal
run and on one whose input is made the bottleneck (a pipeline slowed on purpose), in-process."""

import glob
import os
import time

import numpy as np
import pytest
import tensorflow as tf
from tensorflow.core.util import event_pb2

from model import config
from model.training import input_check, inputs, loop

pytestmark = pytest.mark.slow
SLOW_SECONDS = 0.5  # per training batch of 16 products: ~30 products/s, far below the tiny model's rate


def input_waits(model_dir):
    waits = {}
    for path in glob.glob(os.path.join(model_dir, "logs", "train_steps", "events*")):
        for record in tf.data.TFRecordDataset(path):
            event = event_pb2.Event.FromString(record.numpy())
            for value in event.summary.value:
                if value.tag == "step_input_wait":
                    waits[event.step] = float(tf.make_ndarray(value.tensor))
    return waits


def train(data_dir, model_dir, capsys, training_batches):
    cfg = config.TrainConfig(data_dir=data_dir, model_dir=model_dir, backbone="tiny", image_size=64, batch_size=16,
                             epochs=1, steps_per_epoch=16, log_every_steps=4, sample_products=0,
                             bn_recalibration_steps=1, fusion="mean")
    loop.train(cfg, training_batches=training_batches)
    return capsys.readouterr().out


def test_a_run_whose_input_keeps_up_says_so_and_reads_low(data_dir, tmp_path, capsys):
    """The starved run's mirror: the training batches come from memory, so the input outruns the
    model whatever else the two cores run (reading JPEGs for real, a run measured 0.51-0.63 with
    the other pytest worker busy: on a CPU the pipeline and the model share the cores)."""
    def from_memory(cfg, pipeline):
        return inputs.folder_batches(cfg, pipeline).take(2).cache().repeat()

    out = train(data_dir, str(tmp_path / "m"), capsys, from_memory)
    verdict = next(line for line in out.splitlines() if line.startswith("Input check"))
    assert verdict.endswith(": the input keeps up"), verdict
    waits = input_waits(str(tmp_path / "m"))
    assert len(waits) >= 2 and all(0.0 <= w <= 1.0 for w in waits.values())
    assert np.median(list(waits.values())) < 0.5, waits


def test_a_starved_run_says_so_and_reads_high(data_dir, tmp_path, capsys):
    def pause(features, label):
        tf.py_function(lambda: time.sleep(SLOW_SECONDS), [], [])
        return features, label

    def slowed(cfg, pipeline):
        return inputs.folder_batches(cfg, pipeline).map(pause)

    out = train(data_dir, str(tmp_path / "m"), capsys, slowed)
    verdict = next(line for line in out.splitlines() if line.startswith("Input check"))
    assert ": the input falls short, the devices would wait ~" in verdict and "tf.data service workers" in verdict
    waits = input_waits(str(tmp_path / "m"))
    assert len(waits) >= 2 and min(waits.values()) > 0.7, waits


@pytest.mark.parametrize("model,delivered,expected", [
    (100.0, 250.0, ": the input keeps up"),
    (100.0, 100.0, ": the input keeps up"),
    (400.0, 100.0, "would wait ~75% of the time. Add tf.data service workers (README section 6): about 3 with"),
    (100.0, None, "the input is read from the tf.data service: watch step_input_wait in TensorBoard"),
])
def test_the_verdict(model, delivered, expected):
    line = input_check.Rates(model, delivered).verdict("8 replicas on GPU:0..7")
    assert line.startswith(f"Input check (8 replicas on GPU:0..7): the model consumes {model:,.0f} products/s")
    assert line.endswith(expected) or expected in line
