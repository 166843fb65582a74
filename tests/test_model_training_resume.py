"""A resumed run reads exactly the batches an uninterrupted run reads, on 2 replicas
(MirroredStrategy over conftest.py's 2 logical CPUs), and ends with the same weights.

In-process (loop.train), so it costs no TensorFlow start-up: the run is cut by an exception
from a callback right after the backup of a step inside epoch 2, as a SIGKILL there would cut
it. The 1-replica run killed for real (SIGKILL, twice) is in test_model_training_run.py.
"""

import os

import keras
import numpy as np
import pytest

from model import config as config_lib
from model.training import inputs, loop
from tests import trace_batches
from tests.record_helpers import write_data_dir

pytestmark = pytest.mark.slow


class Cut(Exception):
    """What ends the run at the chosen step, as a kill would."""


class CutAfter(keras.callbacks.Callback):
    def __init__(self, step: int):
        super().__init__()
        self.step = step

    def on_train_batch_end(self, batch, logs=None):
        # Runs after the built-in callbacks: the backup of this step is written.
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            raise Cut(self.step)


class CutAtEnd(CutAfter):
    """Ends the run once fit is done (the last epoch's backup written), as a kill during the final
    BatchNorm recalibration or export would."""

    def on_train_batch_end(self, batch, logs=None):
        pass

    def on_train_end(self, logs=None):
        if int(self.model.optimizer.iterations.numpy()) == self.step:
            raise Cut(self.step)


def test_two_replicas_resumed_inside_epoch_2_read_and_end_as_an_uninterrupted_run(tmp_path, capsys):
    """Also what a run on 2 replicas without val leaves: no best model, no level1 head for a tree
    of one level1 class; and under mixed_bfloat16 and late fusion, the same exactness."""
    data = write_data_dir(str(tmp_path / "noval"), with_val=False, one_level1=True)
    settings = dict(data_dir=data, backbone="tiny", image_size=40, crop_size=32, batch_size=8, epochs=3,
                    steps_per_epoch=4, sample_products=0, cpu_devices=2, bn_recalibration_steps=2,
                    backup_every_steps=1, warmup_epochs=0.5, input_check=False, seed=11, verbose=0,
                    fusion="late", precision="mixed_bfloat16")
    uninterrupted = config_lib.TrainConfig(model_dir=str(tmp_path / "uninterrupted"), **settings)
    resumed = config_lib.TrainConfig(model_dir=str(tmp_path / "resumed"), **settings)
    # Every batch the training streams make: (pipeline, batch index from the stream's start,
    # product ids), the same test aid as tests/slow_train.py's, in-process.
    traced = []
    batches = trace_batches.traced(inputs.folder_batches, lambda *batch: traced.append(batch))
    try:
        state = loop.train(uninterrupted, training_batches=batches)
        made = {(pipeline, batch): ids for pipeline, batch, ids in traced}
        again = loop.train(uninterrupted, training_batches=batches)  # a finished run is never started over
        traced.clear()
        with pytest.raises(Cut):
            loop.train(resumed, extra_callbacks=(CutAfter(6),), training_batches=batches)  # inside epoch 2 (steps 5..8)
        with pytest.raises(Cut):
            loop.train(resumed, extra_callbacks=(CutAtEnd(12),), training_batches=batches)
        resumed_state = loop.train(resumed, training_batches=batches)  # no epoch left: the final steps only
    finally:
        keras.config.set_dtype_policy("float32")  # the policy is global: leave it as found
    out = capsys.readouterr().out
    assert "2 replicas on CPU:0..1 (MirroredStrategy)" in out
    assert "No val split" in out and "training without validation" in out
    assert state["optimizer_iterations"] == 12 and again == state and "already holds a finished run" in out
    assert "No level1 head: labels.csv has one level1 class." in out
    assert f"Resuming from {resumed.model_dir}/backup: epoch 2/3, optimizer step 6" in out
    # Issue 28 item 5: the rerun after a kill in the final steps kept the last epoch's figures
    # (they were "final": {}, printed as nan).
    assert f"Resuming from {resumed.model_dir}/backup: epoch 3/3, optimizer step 12" in out
    assert resumed_state["resumed_step"] == 12 and resumed_state["final"]["products_per_second"] > 0
    assert {k: v for k, v in resumed_state["final"].items() if k != "products_per_second"} == \
        {k: v for k, v in state["final"].items() if k != "products_per_second"}

    # One pipeline feeds both replicas, one batch each a step: step 6 starts at batch 12, and the
    # fit call of epoch 3 (step 8) at batch 16. (Each fit call also makes a stream it peeks one
    # batch from, then drops: Keras' symbolic build.)
    assert {pipeline for pipeline, _ in made} == {0} and set(range(24)) <= {batch for _, batch in made}
    starts = {batch for i, (_, batch, _) in enumerate(traced) if i == 0 or traced[i - 1][1] + 1 != batch}
    assert starts == {0, 12, 16}, starts
    # Trained on: 3 epochs x 4 steps x 2 replicas = batches 0..23 (streams read ahead of that).
    trained = [(pipeline, batch, ids) for pipeline, batch, ids in traced if batch < 24]
    assert {batch for _, batch, _ in trained} >= set(range(12, 24))
    assert all(made[(pipeline, batch)] == ids for pipeline, batch, ids in trained)

    def model(run):
        return keras.models.load_model(os.path.join(run.model_dir, "model.keras"), compile=False)

    assert set(model(uninterrupted).output) == {"category", "level2"}
    for a, b in zip(model(uninterrupted).get_weights(), model(resumed).get_weights()):
        np.testing.assert_array_equal(a, b)
    for run in (uninterrupted, resumed):
        assert os.path.exists(os.path.join(run.model_dir, "export")) and not os.path.exists(
            os.path.join(run.model_dir, "best.keras"))
