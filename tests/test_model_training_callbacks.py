"""model/training/callbacks.py on a model of two Dense heads (fit in-process, a few steps) or driven
by hand with a fake clock: when Backup saves and what restore_backup returns, the numbers of
Throughput and StepScalars, ProfileSteps' window in optimizer steps, EpochProgress' epoch line,
StopOnSignal inside fit, and the list make_callbacks builds (BestModel across a resume is
test_model_training_faults')."""

import glob
import json
import os
import signal
import types

import keras
import numpy as np
import pytest
import tensorflow as tf

from model.config import TrainConfig
from model.signals import StopRequests
from model.training import callbacks, optimization

BATCH = 2


def small_model(steps_per_execution: int = 1, learning_rate=0.01, run_eagerly=True, dropout=0.0) -> keras.Model:
    """{"category", "level1"} logits from 3 inputs, compiled as train.py compiles (metric names
    category_top1...). Eager unless asked: a few steps run faster than a trace (the callbacks are
    called the same way). dropout > 0 adds a layer drawing random numbers (a SeedGenerator)."""
    inputs = keras.Input((3,), name="x")
    hidden = keras.layers.Dense(4, name="hidden")(inputs)
    if dropout:
        hidden = keras.layers.Dropout(dropout, seed=3)(hidden)
    model = keras.Model(inputs, {"category": keras.layers.Dense(5, name="category")(hidden),
                                 "level1": keras.layers.Dense(2, name="level1")(hidden)})
    cfg = TrainConfig(data_dir="unused", model_dir="unused", steps_per_execution=steps_per_execution)
    optimization.compile_model(model, cfg, optimization.make_optimizer(cfg, learning_rate), {"level1": 2})
    model.run_eagerly = run_eagerly
    return model


def batches(steps: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 5, steps * BATCH)
    x = rng.normal(size=(steps * BATCH, 3)).astype(np.float32)
    return x, {"category": np.eye(5, dtype=np.float32)[labels], "level1": np.eye(2, dtype=np.float32)[labels % 2]}


def fit(model, steps_per_epoch: int, epochs: int, callback_list, **options):
    x, y = batches(steps_per_epoch)
    return model.fit(x, y, batch_size=BATCH, epochs=epochs, verbose=0, callbacks=callback_list, shuffle=False,
                     **options)


def iterations(model) -> int:
    return int(model.optimizer.iterations.numpy())


class Clock:
    """Stands in for the `time` module of callbacks: perf_counter returns `now`."""

    def __init__(self):
        self.now = 0.0

    def perf_counter(self):
        return self.now


@pytest.fixture
def clock(monkeypatch):
    fake = Clock()
    monkeypatch.setattr(callbacks, "time", fake)
    return fake


def fake_model(step: int = 0, learning_rate: float = 0.0, steps_per_execution: int = 1):
    """What the step-counting callbacks read of a model: its optimizer's step and learning rate."""
    return types.SimpleNamespace(
        optimizer=types.SimpleNamespace(iterations=np.int64(step), learning_rate=np.float32(learning_rate)),
        steps_per_execution=steps_per_execution)


# ---------------------------------------------------------------------------------------------
# Backup and restore_backup


class RecordingBackup(callbacks.Backup):
    def __init__(self, *args):
        super().__init__(*args)
        self.saved = []

    def save(self, step):
        super().save(step)
        self.saved.append(step)


def drive(callback, model, executions: list[int], epochs: int):
    """Calls `callback` as fit does: `epochs` epochs of executions of so many optimizer steps each,
    the model's step count moved by each (no training)."""
    callback.set_model(model)
    callback.on_train_begin()
    for epoch in range(epochs):
        callback.on_epoch_begin(epoch)
        for batch, steps in enumerate(executions):
            model.optimizer.iterations.assign(model.optimizer.iterations + steps)
            callback.on_train_batch_end(batch, {})
        callback.on_epoch_end(epoch, {"loss": float(iterations(model))})
    callback.on_train_end()


@pytest.mark.parametrize("every, steps_per_epoch, executions, epochs, start, saved, progress", [
    # Every 3 steps and at each epoch's end: 3, 5 | 8, 10.
    (3, 5, [1] * 5, 2, 0, [3, 5, 8, 10], {"optimizer_step": 10, "epoch": 2, "step_in_epoch": 0}),
    # A period longer than an epoch: the epoch ends only.
    (100, 4, [1] * 4, 2, 0, [4, 8], {"optimizer_step": 8, "epoch": 2, "step_in_epoch": 0}),
    # Executions of 2 steps: the step count seen at 2, 4, 6 -> a save at 4 (4 - 0 >= 3), then the end.
    (3, 6, [2] * 3, 1, 0, [4, 6], {"optimizer_step": 6, "epoch": 1, "step_in_epoch": 0}),
    # A resumed run counts from the restored step (7): 10 is 3 later; the position is the optimizer
    # step against the run's epochs, so the fit call's end at 12 is epoch 2, step 2 in it.
    (3, 5, [1] * 5, 1, 7, [10, 12], {"optimizer_step": 12, "epoch": 2, "step_in_epoch": 2}),
])
def test_backup_saves_every_n_steps_and_at_each_epoch_end(tmp_path, every, steps_per_epoch, executions, epochs,
                                                          start, saved, progress):
    model = small_model()
    model.optimizer.iterations.assign(start)
    backup = RecordingBackup(str(tmp_path / "backup"), every, steps_per_epoch)
    drive(backup, model, executions, epochs)
    assert backup.saved == saved
    assert json.loads((tmp_path / "backup" / callbacks.BACKUP_PROGRESS).read_text()) == progress
    # Written whole: the files under their names, nothing partial beside them, and the random
    # states of the last step only.
    assert sorted(os.listdir(tmp_path / "backup")) == sorted(
        [callbacks.BACKUP_PROGRESS, callbacks.BACKUP_WEIGHTS, f"random_states-{saved[-1]}.json",
         callbacks.BACKUP_EPOCH_LOGS])
    # The last epoch end's logs, for a rerun with no epoch left (issue 28 item 5); none at another step.
    last = saved[-1]
    assert callbacks.last_epoch_logs(str(tmp_path / "backup"), last) == {"loss": float(last)}
    assert callbacks.last_epoch_logs(str(tmp_path / "backup"), last + 1) == {}


def test_restore_backup_loads_weights_and_optimizer_and_returns_the_step(tmp_path):
    """In a real fit (4 steps an epoch, 2 epochs), restored into a new model: the weights, the
    optimizer and the random states (which Keras' save_weights leaves out)."""
    trained = small_model(dropout=0.5)
    backup = RecordingBackup(str(tmp_path), 3, 4)
    fit(trained, 4, 2, [backup])
    assert iterations(trained) == 8 and backup.saved == [3, 4, 7, 8]

    fresh = small_model(dropout=0.5)
    assert not fresh.optimizer.built
    states = [v for v in trained.variables if v.path.endswith("seed_generator_state")]
    assert len(states) == 1 and np.array(states[0]).tolist() != [3, 0]  # drawn from: it moved
    assert callbacks.restore_backup(fresh, str(tmp_path)) == 8
    for restored, saved in zip(fresh.variables, trained.variables):
        np.testing.assert_array_equal(np.array(restored), np.array(saved), err_msg=restored.path)
    assert iterations(fresh) == 8
    for restored, saved in zip(fresh.weights, trained.weights):
        np.testing.assert_array_equal(np.array(restored), np.array(saved), err_msg=restored.path)
    for restored, saved in zip(fresh.optimizer.variables, trained.optimizer.variables):  # Adam's moments too
        np.testing.assert_array_equal(np.array(restored), np.array(saved), err_msg=restored.path)


def test_a_backup_without_random_states_restores_and_says_the_draws_restart(tmp_path, capsys):
    trained = small_model(dropout=0.5)
    fit(trained, 4, 1, [RecordingBackup(str(tmp_path), 3, 4)])
    os.remove(tmp_path / "random_states-4.json")
    fresh = small_model(dropout=0.5)
    assert callbacks.restore_backup(fresh, str(tmp_path)) == 4
    assert "holds no random states of step 4" in capsys.readouterr().out


def test_restore_backup_without_a_backup_returns_0_and_changes_nothing(tmp_path):
    model = small_model()
    before = [np.array(w) for w in model.weights]
    assert callbacks.restore_backup(model, str(tmp_path / "none")) == 0
    assert not model.optimizer.built
    for weight, value in zip(model.weights, before):
        np.testing.assert_array_equal(np.array(weight), value)


# ---------------------------------------------------------------------------------------------
# Throughput


@pytest.mark.parametrize("ends, expected", [
    # Steps 1-3 timed between the ends of the first and the last execution: 3 steps x 8 in 3 s.
    ([(0, 5.0), (1, 6.0), (2, 7.0), (3, 8.0)], 8.0),
    # Executions of 2 steps report their last step's index: 1, 3, 5 -> 4 steps in 2 s.
    ([(1, 5.0), (3, 6.0), (5, 7.0)], 16.0),
    # One execution: timed whole from the epoch's start, 1 step in 2 s.
    ([(0, 2.0)], 4.0),
    # One execution of 4 steps in 2 s.
    ([(3, 2.0)], 16.0),
    ([], None),  # no step: nothing to report
    ([(0, 0.0)], None),  # no time measured: no figure rather than infinity
])
def test_throughput(clock, ends, expected):
    throughput = callbacks.Throughput(global_batch=8)
    throughput.on_epoch_begin(0)
    for batch, now in ends:
        clock.now = now
        throughput.on_train_batch_end(batch, {})
    logs = {"loss": 1.0}
    throughput.on_epoch_end(0, logs)
    assert logs.get("products_per_second") == expected
    throughput.on_epoch_end(0, None)  # Keras may pass no logs: no error


def test_throughput_restarts_every_epoch(clock):
    throughput = callbacks.Throughput(global_batch=10)
    for epoch, (start, step_seconds) in enumerate([(0.0, 1.0), (100.0, 0.5)]):
        clock.now = start
        throughput.on_epoch_begin(epoch)
        for batch in range(3):
            clock.now = start + 5.0 + batch * step_seconds  # the first execution pays 5 s of tracing
            throughput.on_train_batch_end(batch, {})
        logs = {}
        throughput.on_epoch_end(epoch, logs)
        assert logs["products_per_second"] == 10 / step_seconds


# ---------------------------------------------------------------------------------------------
# StepScalars


def read_scalars(log_dir: str) -> dict:
    """(tag, step) -> value of every scalar in log_dir's event files."""
    values = {}
    for path in glob.glob(os.path.join(log_dir, "events.out.tfevents.*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                values[value.tag, event.step] = float(tf.make_ndarray(value.tensor))
    return values


def test_step_scalars_every_n_optimizer_steps(tmp_path, clock):
    log_dir = str(tmp_path / "train_steps")
    scalars = callbacks.StepScalars(log_dir, every_steps=2, global_batch=8)
    model = fake_model()
    scalars.set_model(model)

    def step(optimizer_step, now):
        model.optimizer.iterations = np.int64(optimizer_step)
        model.optimizer.learning_rate = np.float32(optimizer_step / 100)
        clock.now = now
        scalars.on_train_batch_end(0, {"loss": 10.0 - optimizer_step, callbacks.TOP1: optimizer_step / 10,
                                       "category_top5": 0.9, "level1_loss": 7.0})

    scalars.on_train_begin()
    for optimizer_step, now in [(1, 10.0), (2, 11.0), (3, 12.0), (4, 12.5), (5, 13.0)]:
        step(optimizer_step, now)
    scalars.on_train_begin()  # a second fit call (a resumed run): its first interval holds tracing again
    for optimizer_step, now in [(7, 50.0), (8, 51.0), (9, 54.0)]:
        step(optimizer_step, now)

    # Points at 3 and 5 (the first interval, from step 1, is the mark), then at 9 (from 7).
    assert read_scalars(log_dir) == pytest.approx({
        ("step_loss", 3): 7.0, ("step_category_top1", 3): 0.3, ("step_learning_rate", 3): 0.03,
        ("step_products_per_second", 3): 2 * 8 / 2.0,
        ("step_loss", 5): 5.0, ("step_category_top1", 5): 0.5, ("step_learning_rate", 5): 0.05,
        ("step_products_per_second", 5): 2 * 8 / 1.0,
        ("step_loss", 9): 1.0, ("step_category_top1", 9): 0.9, ("step_learning_rate", 9): 0.09,
        ("step_products_per_second", 9): 2 * 8 / 4.0,
    })


def test_step_scalars_in_a_real_fit_read_the_schedule(tmp_path):
    """In fit: the points land on optimizer steps (executions of 2 steps) and the learning rate is
    the schedule's at that step."""
    schedule = keras.optimizers.schedules.PolynomialDecay(0.1, decay_steps=10, end_learning_rate=0.0)
    model = small_model(steps_per_execution=2, learning_rate=schedule, run_eagerly=False)
    log_dir = str(tmp_path / "train_steps")
    fit(model, 8, 1, [callbacks.StepScalars(log_dir, every_steps=4, global_batch=BATCH)])
    scalars = read_scalars(log_dir)
    assert sorted({step for _, step in scalars}) == [6]  # seen at 2 (the mark), 4, 6 (6 - 2 >= 4: a point), 8
    assert {tag for tag, _ in scalars} == {"step_loss", "step_category_top1", "step_learning_rate",
                                           "step_products_per_second"}
    assert scalars["step_learning_rate", 6] == pytest.approx(float(schedule(6)))


# ---------------------------------------------------------------------------------------------
# ProfileSteps


@pytest.fixture
def profiler(monkeypatch):
    """tf.profiler's start, stop and step markers, recorded instead of run."""
    calls = []

    class Trace:
        def __init__(self, name, step_num, _r):
            self.step_num = step_num

        def __enter__(self):
            calls.append(("trace", self.step_num))

        def __exit__(self, *exc):
            calls.append(("end", self.step_num))

    monkeypatch.setattr(tf.profiler.experimental, "start", lambda log_dir: calls.append(("start", log_dir)))
    monkeypatch.setattr(tf.profiler.experimental, "stop", lambda: calls.append(("stop",)))
    monkeypatch.setattr(tf.profiler.experimental, "Trace", Trace)
    return calls


@pytest.mark.parametrize("first, last, per_execution, begin, end, covered, traced", [
    (3, 5, 1, 0, 8, (3, 5), [3, 4, 5]),
    # Executions of 2 steps (1-2, 3-4, 5-6): the window widens to the executions holding 3 and 5.
    (3, 5, 2, 0, 8, (3, 6), [3, 5]),
    (3, 5, 4, 0, 8, (1, 8), [1, 5]),
    (1, 1, 1, 0, 3, (1, 1), [1]),
    # The run ends inside the window: the trace stops with it.
    (3, 100, 1, 0, 5, (3, 5), [3, 4, 5]),
    # A run resumed at step 4 of a 3-5 window profiles what is left of it.
    (3, 5, 1, 4, 8, (5, 5), [5]),
])
def test_profile_window_in_optimizer_steps(profiler, capsys, first, last, per_execution, begin, end, covered, traced):
    profile = callbacks.ProfileSteps("LOGDIR", first, last)
    model = fake_model(begin, steps_per_execution=per_execution)
    profile.set_model(model)
    done = begin
    while done < end:
        profile.on_train_batch_begin(0)
        done += per_execution
        model.optimizer.iterations = np.int64(done)
        profile.on_train_batch_end(0)
    profile.on_train_end()
    assert profile.covered == covered
    assert profiler[0] == ("start", "LOGDIR") and profiler[-1] == ("stop",)
    assert [call for call in profiler if call[0] == "trace"] == [("trace", n) for n in traced]
    assert [call for call in profiler if call[0] == "end"] == [("end", n) for n in traced]  # each marker closed
    assert capsys.readouterr().out == f"Profiled optimizer steps {covered[0]}-{covered[1]} into LOGDIR\n"


def test_profile_window_after_the_run_profiles_nothing(profiler, capsys):
    profile = callbacks.ProfileSteps("LOGDIR", 10, 12)
    model = fake_model()
    profile.set_model(model)
    for step in range(1, 6):
        profile.on_train_batch_begin(0)
        model.optimizer.iterations = np.int64(step)
        profile.on_train_batch_end(0)
    profile.on_train_end()
    assert profile.covered is None and profiler == [] and capsys.readouterr().out == ""


# ---------------------------------------------------------------------------------------------
# EpochProgress


@pytest.mark.parametrize("total, initial_epoch, epochs, line, not_line", [
    (1, 0, 1, "Epoch 1/1", None),  # Keras alone prints no epoch line for a single epoch
    (3, 1, 2, "Epoch 2/3", "Epoch 2/2"),  # a resumed run counts the run's epochs, not the fit call's
])
def test_epoch_progress_line(capsys, total, initial_epoch, epochs, line, not_line):
    model = small_model()
    x, y = batches(2)
    capsys.readouterr()
    model.fit(x, y, batch_size=BATCH, epochs=epochs, initial_epoch=initial_epoch, verbose=2,
              callbacks=[callbacks.EpochProgress(total)])
    out = capsys.readouterr().out
    assert line in out.splitlines()
    assert " - loss: " in out
    if not_line:
        assert not_line not in out


# ---------------------------------------------------------------------------------------------
# StopOnSignal (real signals to train.py: test_model_training_faults)


class SignalAt(keras.callbacks.Callback):
    """Records a signal as the handler would when the optimizer reaches `step`."""

    def __init__(self, requests, step):
        super().__init__()
        self.requests, self.step = requests, step

    def on_train_batch_end(self, batch, logs=None):
        if iterations(self.model) == self.step:
            self.requests.signum = signal.SIGTERM


def test_stop_on_signal_backs_up_the_step_and_stops_fit(tmp_path):
    requests = StopRequests()
    backup = callbacks.Backup(str(tmp_path), every_steps=100, steps_per_epoch=5)
    model = small_model()
    fit(model, 5, 2, [SignalAt(requests, 3), backup, callbacks.StopOnSignal(requests, backup)])
    assert iterations(model) == 3  # the step in flight finished, no other
    assert json.loads((tmp_path / callbacks.BACKUP_PROGRESS).read_text()) == {
        "optimizer_step": 3, "epoch": 0, "step_in_epoch": 3}


# ---------------------------------------------------------------------------------------------
# make_callbacks


def kinds(callback_list):
    return [type(c).__name__ for c in callback_list]


@pytest.mark.parametrize("has_val, log_every_steps, profile_steps, stop, expected", [
    (False, 0, "", False, ["TerminateOnNaN", "Throughput", "Backup", "TensorBoard", "EpochProgress"]),
    (True, 10, "3,7", True, ["TerminateOnNaN", "Throughput", "Backup", "StopOnSignal", "BestModel", "StepScalars",
                             "ProfileSteps", "TensorBoard", "EpochProgress"]),
])
def test_make_callbacks_list_and_order(has_val, log_every_steps, profile_steps, stop, expected):
    made = callbacks.make_callbacks("/run", epochs=3, steps_per_epoch=4, global_batch=8, backup_every_steps=0,
                                    log_every_steps=log_every_steps, profile_steps=profile_steps, has_val=has_val,
                                    stop_requests=StopRequests() if stop else None)
    assert kinds(made) == expected
    by_kind = {type(c).__name__: c for c in made}
    backup = by_kind["Backup"]
    assert (backup.backup_dir, backup.every_steps, backup.steps_per_epoch) == ("/run/backup", 1, 4)
    assert by_kind["Throughput"].global_batch == 8 and by_kind["EpochProgress"].total_epochs == 3
    assert by_kind["TensorBoard"].log_dir == "/run/logs"
    if has_val:
        best = by_kind["BestModel"]
        assert (best.path, best.score_path, best.monitor) == ("/run/best.keras", "/run/best.json",
                                                              "val_category_top1")
        assert by_kind["StopOnSignal"].backup is backup
        steps = by_kind["StepScalars"]
        assert (steps.log_dir, steps.every_steps, steps.global_batch) == ("/run/logs/train_steps", 10, 8)
        profile = by_kind["ProfileSteps"]
        assert (profile.log_dir, profile.first, profile.last) == ("/run/logs/train", 3, 7)
