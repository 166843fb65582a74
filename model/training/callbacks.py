"""What training reports and keeps while it runs: Keras callbacks for progress, throughput,
TensorBoard scalars and profile, the backup, best.keras, and the stop on SIGINT/SIGTERM."""

from __future__ import annotations

import json
import math
import os
import time

import keras
import tensorflow as tf

from model import atomic
from model.model_dir import RunFolder
from model.training import random_states

# The monitored metric: Keras prefixes metric names with the output name for dict outputs.
TOP1 = "category_top1"


class EpochProgress(keras.callbacks.ProgbarLogger):
    """Keras' progress logger, with `Epoch N/M` counted over the whole run (a resumed run trains in
    more than one fit call) and printed even when M == 1 (Keras skips it then)."""

    def __init__(self, epochs: int):
        super().__init__()
        self.total_epochs = epochs

    def set_params(self, params):
        super().set_params(params)
        self.epochs = self.total_epochs

    def on_epoch_begin(self, epoch, logs=None):
        if self.verbose and self.epochs == 1:
            print(f"Epoch {epoch + 1}/{self.epochs}", flush=True)
        super().on_epoch_begin(epoch, logs)


class Throughput(keras.callbacks.Callback):
    """Adds `products_per_second` (training steps only) to the epoch logs.

    Timed between the ends of an epoch's first and last executions, so the tracing and compilation
    paid in the first are not counted; an epoch of one execution is timed whole. Keras reports the
    index of an execution's last step, so steps are counted from those indices, not from the calls
    (with steps_per_execution > 1 they differ).
    """

    def __init__(self, global_batch: int):
        super().__init__()
        self.global_batch = global_batch

    def on_epoch_begin(self, epoch, logs=None):
        self._begin, self._first, self._last = time.perf_counter(), None, None

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self._first is None:
            self._first = (batch, now)
        self._last = (batch, now)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or self._first is None:
            return
        if self._last[0] > self._first[0]:
            steps, seconds = self._last[0] - self._first[0], self._last[1] - self._first[1]
        else:
            steps, seconds = self._last[0] + 1, self._last[1] - self._begin
        if seconds > 0:
            logs["products_per_second"] = steps * self.global_batch / seconds


def _optimizer_step(model: keras.Model) -> int:
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


class StepScalars(keras.callbacks.Callback):
    """Scalars every `every_steps` optimizer steps, so that a long epoch draws a curve: the loss and
    top-1 so far in the epoch (Keras' running means), the learning rate, products/s since the
    last point and, given the compute time per product measured at start (input_check), the
    share of the window's training time not explained by compute (`step_input_wait`). Written to
    logs/train_steps, against the optimizer step. The time between two epochs (validation, the
    epoch-end backup and best model) is not counted.

    Also a progress line at a window's end once `progress_seconds` have passed since the last
    one: a long epoch shows where it is without TensorBoard."""

    def __init__(self, log_dir: str, every_steps: int, global_batch: int, *, total_steps: int = 0,
                 compute_seconds_per_product: float | None = None, progress_seconds: float = 30.0):
        super().__init__()
        self.log_dir, self.every_steps, self.global_batch = log_dir, every_steps, global_batch
        self.total_steps, self.compute = total_steps, compute_seconds_per_product
        self.progress_seconds = progress_seconds
        self._writer = None

    def on_train_begin(self, logs=None):
        if self._writer is None:
            self._writer = tf.summary.create_file_writer(self.log_dir)
        self._mark = None  # (step, time) of the last point; none yet: the first interval holds tracing
        self._excluded = 0.0  # seconds between epochs inside the current window
        self._gap_from = self._last_end = None
        self._printed = time.perf_counter()

    def on_epoch_end(self, epoch, logs=None):
        self._gap_from = self._last_end  # to the next epoch's first step: validation, epoch-end saves

    def on_train_batch_begin(self, batch, logs=None):
        if self._gap_from is not None:
            self._excluded += time.perf_counter() - self._gap_from
            self._gap_from = None

    def on_train_batch_end(self, batch, logs=None):
        step, now = _optimizer_step(self.model), time.perf_counter()
        self._last_end = now
        if self._mark is None:
            self._mark, self._excluded = (step, now), 0.0
            return
        if step - self._mark[0] < self.every_steps:
            return
        steps, seconds = step - self._mark[0], max(now - self._mark[1] - self._excluded, 1e-9)
        rate = steps * self.global_batch / seconds
        wait = None if self.compute is None else min(1.0, max(0.0, 1.0 - rate * self.compute))
        logs = logs or {}
        with self._writer.as_default(step=step):
            for name, value in logs.items():
                if name in ("loss", TOP1):
                    tf.summary.scalar(f"step_{name}", float(value))
            tf.summary.scalar("step_learning_rate", float(keras.ops.convert_to_numpy(self.model.optimizer.learning_rate)))
            tf.summary.scalar("step_products_per_second", rate)
            if wait is not None:
                tf.summary.scalar("step_input_wait", wait, description=(
                    "Share of this window's training time (time between epochs excluded) not explained by compute "
                    "at the rate measured on one cached batch at start: time the devices waited for input, or for "
                    "anything else that stalls the step loop (a mid-epoch backup being written)."))
        self._writer.flush()
        if now - self._printed >= self.progress_seconds:
            self._print_progress(step, logs, rate, wait, seconds / steps)
            self._printed = now
        self._mark, self._excluded = (step, now), 0.0

    def _print_progress(self, step, logs, rate, wait, seconds_per_step):
        parts = [f"step {step}" + (f"/{self.total_steps}" if self.total_steps else "")]
        if "loss" in logs:
            parts.append(f"loss {float(logs['loss']):.4f}")
        parts.append(f"{rate:,.0f} products/s")
        if wait is not None:
            parts.append(f"input wait {wait:.0%}")
        if self.total_steps > step:
            parts.append(f"ETA {_duration((self.total_steps - step) * seconds_per_step)} (training steps only)")
        print("  " + ", ".join(parts), flush=True)


def _duration(seconds: float) -> str:
    minutes, seconds = divmod(int(seconds), 60)
    hours, minutes = divmod(minutes, 60)
    return f"{hours}h{minutes:02d}m" if hours else f"{minutes}m{seconds:02d}s"


class ProfileSteps(keras.callbacks.Callback):
    """Profiles optimizer steps first..last (1-based, inclusive) into log_dir/plugins/profile.

    Keras' TensorBoard callback counts calls of the train function, which are executions of
    steps_per_execution steps each; here the window is in optimizer steps whatever that is: it
    covers the executions holding those steps (so it may start and end up to an execution wider).
    """

    def __init__(self, log_dir: str, first: int, last: int):
        super().__init__()
        self.log_dir, self.first, self.last = log_dir, first, last
        self.covered = None  # (first, last) optimizer step actually inside the trace
        self._step_marker = None

    def on_train_batch_begin(self, batch, logs=None):
        done = _optimizer_step(self.model)
        if self.covered is None and done < self.last and done + self._steps_per_call() >= self.first:
            tf.profiler.experimental.start(self.log_dir)
            self.covered = (done + 1, None)
        if self._tracing():
            # XProf's step marker: a `train` block per execution in the Trace Viewer, numbered by
            # its first optimizer step. Keras 2 set one around every call of the train function;
            # Keras 3 sets none.
            self._step_marker = tf.profiler.experimental.Trace("train", step_num=done + 1, _r=1)
            self._step_marker.__enter__()

    def on_train_batch_end(self, batch, logs=None):
        if self._step_marker is not None:
            self._step_marker.__exit__(None, None, None)
            self._step_marker = None
        if self._tracing() and _optimizer_step(self.model) >= self.last:
            self._stop()

    def _tracing(self) -> bool:
        return self.covered is not None and self.covered[1] is None

    def on_train_end(self, logs=None):
        if self._tracing():
            self._stop()

    def _steps_per_call(self) -> int:
        return int(getattr(self.model, "steps_per_execution", 1) or 1)

    def _stop(self) -> None:
        tf.profiler.experimental.stop()
        self.covered = (self.covered[0], _optimizer_step(self.model))
        print(f"Profiled optimizer steps {self.covered[0]}-{self.covered[1]} into {self.log_dir}", flush=True)


BACKUP_WEIGHTS = "latest.weights.h5"  # weights and optimizer state (its step count included)
BACKUP_PROGRESS = "progress.json"  # where the backup stands, for people and tests: no code reads it
BACKUP_EPOCH_LOGS = "epoch_logs.json"  # the last finished epoch's logs, for a rerun that has no epoch left


class Backup(keras.callbacks.Callback):
    """Backs up weights and optimizer state every `every_steps` optimizer steps and at the end of
    every epoch, so that a kill loses at most `every_steps` steps and never a finished epoch.

    Keras' BackupAndRestore saves on one of the two schedules only, and its restore replays the
    steps already done in an interrupted epoch; here the optimizer's step count is the whole
    position (train() derives the epoch and the steps left in it), so nothing is redone. Each save
    goes to a temporary name and is then renamed: a kill during a save leaves the last one whole.
    """

    def __init__(self, backup_dir: str, every_steps: int, steps_per_epoch: int):
        super().__init__()
        self.backup_dir, self.every_steps, self.steps_per_epoch = backup_dir, every_steps, steps_per_epoch

    def on_train_begin(self, logs=None):
        self._saved_at = _optimizer_step(self.model)

    def on_train_batch_end(self, batch, logs=None):
        step = _optimizer_step(self.model)
        if step - self._saved_at >= self.every_steps:
            self.save(step)

    def on_epoch_end(self, epoch, logs=None):
        step = _optimizer_step(self.model)
        tf.io.gfile.makedirs(self.backup_dir)
        # Before the weights of that step: a backup whose weights are the run's last step always
        # has that epoch's figures beside it (a kill during the final recalibration or export
        # then still reports them). Throughput runs before Backup: products_per_second included.
        atomic.write_text(os.path.join(self.backup_dir, BACKUP_EPOCH_LOGS), json.dumps(
            {"optimizer_step": step, "logs": {name: float(value) for name, value in (logs or {}).items()}}))
        self.save(step)

    def save(self, step: int) -> None:
        tf.io.gfile.makedirs(self.backup_dir)
        random_states.save(self.backup_dir, self.model, step)  # first: see random_states
        with atomic.written_whole(os.path.join(self.backup_dir, BACKUP_WEIGHTS)) as partial:
            self.model.save_weights(partial, overwrite=True)
        random_states.drop_older(self.backup_dir, step)
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        atomic.write_text(os.path.join(self.backup_dir, BACKUP_PROGRESS),
                          json.dumps({"optimizer_step": step, "epoch": epoch, "step_in_epoch": in_epoch}))
        self._saved_at = step


class BestModel(keras.callbacks.Callback):
    """best.keras: the model of the epoch with the highest val top-1, written whole.

    Its score is kept beside it (best.json), so a resumed run compares against the best of the
    whole run; Keras' ModelCheckpoint starts from scratch and overwrote best.keras with the first
    epoch after every resume."""

    def __init__(self, path: str, score_path: str, monitor: str):
        super().__init__()
        self.path, self.score_path, self.monitor = path, score_path, monitor
        self.best = -math.inf
        if tf.io.gfile.exists(score_path) and tf.io.gfile.exists(path):
            with tf.io.gfile.GFile(score_path) as f:
                self.best = float(json.load(f)[monitor])

    def on_epoch_end(self, epoch, logs=None):
        score = (logs or {}).get(self.monitor)
        if score is None or not score > self.best:
            return
        with atomic.written_whole(self.path) as partial:
            self.model.save(partial)
        atomic.write_text(self.score_path, json.dumps({"epoch": epoch + 1, self.monitor: float(score)}))
        self.best = float(score)


class StopOnSignal(keras.callbacks.Callback):
    """SIGINT or SIGTERM during fit: the step in flight finishes, a backup is written at that
    step (the epoch-end backup when it came during validation), and fit stops; the train loop
    then raises errors.Interrupted."""

    def __init__(self, requests, backup: Backup):
        super().__init__()
        self.requests, self.backup = requests, backup

    def on_train_batch_end(self, batch, logs=None):
        if self.requests.signum is not None:
            self.backup.save(_optimizer_step(self.model))
            self.model.stop_training = True

    def on_epoch_end(self, epoch, logs=None):
        if self.requests.signum is not None:
            self.model.stop_training = True  # Backup ran first: this epoch's end is saved


def restore_backup(model: keras.Model, backup_dir: str) -> int:
    """Loads the last backup into a compiled model, if there is one; returns its optimizer step."""
    weights = os.path.join(backup_dir, BACKUP_WEIGHTS)
    if not tf.io.gfile.exists(weights):
        return 0
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(weights)
    step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    if not random_states.restore(backup_dir, model, step):
        print(f"{backup_dir} holds no random states of step {step} (a backup of an older version): the "
              "training mirror's draws restart from the seed", flush=True)
    return step


def last_epoch_logs(backup_dir: str, step: int) -> dict:
    """The logs of the epoch that ended at optimizer step `step`, as Backup recorded them; {} if
    the backup holds none of that step (a backup of an older version, a kill between the two files)."""
    path = os.path.join(backup_dir, BACKUP_EPOCH_LOGS)
    if not tf.io.gfile.exists(path):
        return {}
    with tf.io.gfile.GFile(path) as f:
        recorded = json.load(f)
    return recorded["logs"] if recorded.get("optimizer_step") == step else {}


def make_callbacks(model_dir: str, *, epochs: int, steps_per_epoch: int, global_batch: int,
                   backup_every_steps: int, log_every_steps: int, profile_steps: str, has_val: bool,
                   stop_requests=None, compute_seconds_per_product: float | None = None) -> list:
    run = RunFolder(model_dir)
    # Kept after fit and removed only once model.keras and export/ exist, so a kill at any
    # moment leaves something to resume from.
    backup = Backup(run.backup, max(1, backup_every_steps), steps_per_epoch)
    # Throughput before Backup: it adds products_per_second to the epoch logs Backup records.
    callbacks = [keras.callbacks.TerminateOnNaN(), Throughput(global_batch), backup]
    if stop_requests is not None:
        callbacks.append(StopOnSignal(stop_requests, backup))
    if has_val:
        callbacks.append(BestModel(run.best_file, run.best_score_file, f"val_{TOP1}"))
    if log_every_steps > 0:
        callbacks.append(StepScalars(os.path.join(run.logs, "train_steps"), log_every_steps, global_batch,
                                     total_steps=epochs * steps_per_epoch,
                                     compute_seconds_per_product=compute_seconds_per_product))
    if profile_steps:
        first, last = (int(step) for step in profile_steps.split(","))
        callbacks.append(ProfileSteps(os.path.join(run.logs, "train"), first, last))
    callbacks += [
        # Epoch-level scalars: loss, top-1/top-5, learning rate, products/s (Throughput runs first
        # and adds it to the same logs dict).
        keras.callbacks.TensorBoard(run.logs, profile_batch=0, write_graph=False),
        EpochProgress(epochs),  # last, so its end-of-epoch line shows products_per_second too
    ]
    return callbacks
