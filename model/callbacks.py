"""What training reports and keeps while it runs: Keras callbacks and the TensorBoard sample grid."""

from __future__ import annotations

import json
import os
import time

import keras
import numpy as np
import tensorflow as tf

from model import model_dir as model_dir_lib

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

    Timed from the end of an epoch's first batch, so tracing and compilation are not counted.
    """

    def __init__(self, global_batch: int):
        super().__init__()
        self.global_batch = global_batch

    def on_epoch_begin(self, epoch, logs=None):
        self._first = None

    def on_train_batch_end(self, batch, logs=None):
        now = time.perf_counter()
        if self._first is None:
            self._first = (batch, now)
        self._last = (batch, now)

    def on_epoch_end(self, epoch, logs=None):
        if logs is None or self._first is None:
            return
        steps, seconds = self._last[0] - self._first[0], self._last[1] - self._first[1]
        if steps > 0 and seconds > 0:
            logs["products_per_second"] = steps * self.global_batch / seconds


BACKUP_WEIGHTS = "latest.weights.h5"  # weights and optimizer state (its step count included)
BACKUP_PROGRESS = "progress.json"  # where the backup stands, for people and tests: no code reads it


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

    def _step(self) -> int:
        return int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))

    def on_train_begin(self, logs=None):
        self._saved_at = self._step()

    def on_train_batch_end(self, batch, logs=None):
        step = self._step()
        if step - self._saved_at >= self.every_steps:
            self._save(step)

    def on_epoch_end(self, epoch, logs=None):
        self._save(self._step())

    def _save(self, step: int) -> None:
        tf.io.gfile.makedirs(self.backup_dir)
        weights = os.path.join(self.backup_dir, BACKUP_WEIGHTS)
        partial = os.path.join(self.backup_dir, "partial." + BACKUP_WEIGHTS)
        self.model.save_weights(partial, overwrite=True)
        tf.io.gfile.rename(partial, weights, overwrite=True)
        epoch, in_epoch = divmod(step, self.steps_per_epoch)
        with tf.io.gfile.GFile(os.path.join(self.backup_dir, BACKUP_PROGRESS), "w") as f:
            json.dump({"optimizer_step": step, "epoch": epoch, "step_in_epoch": in_epoch}, f)
        self._saved_at = step


def restore_backup(model: keras.Model, backup_dir: str) -> int:
    """Loads the last backup into a compiled model, if there is one; returns its optimizer step."""
    weights = os.path.join(backup_dir, BACKUP_WEIGHTS)
    if not tf.io.gfile.exists(weights):
        return 0
    if not model.optimizer.built:
        model.optimizer.build(model.trainable_variables)
    model.load_weights(weights)
    return int(keras.ops.convert_to_numpy(model.optimizer.iterations))


def make_callbacks(model_dir: str, *, epochs: int, steps_per_epoch: int, global_batch: int,
                   backup_every_steps: int, profile_batches: str, has_val: bool) -> list:
    callbacks = [
        keras.callbacks.TerminateOnNaN(),
        # Kept after fit and removed only once model.keras and export/ exist, so a kill at any
        # moment leaves something to resume from.
        Backup(os.path.join(model_dir, model_dir_lib.BACKUP_DIR), max(1, backup_every_steps), steps_per_epoch),
        Throughput(global_batch),
    ]
    if has_val:
        callbacks.append(
            keras.callbacks.ModelCheckpoint(
                os.path.join(model_dir, model_dir_lib.BEST_FILE), monitor=f"val_{TOP1}", mode="max",
                save_best_only=True,
            )
        )
    profile = tuple(int(b) for b in profile_batches.split(",")) if profile_batches else 0
    callbacks += [
        # Epoch-level scalars: loss, top-1/top-5, learning rate, products/s (Throughput runs first
        # and adds it to the same logs dict).
        keras.callbacks.TensorBoard(
            os.path.join(model_dir, model_dir_lib.LOGS_DIR), profile_batch=profile, write_graph=False
        ),
        EpochProgress(epochs),  # last, so its end-of-epoch line shows products_per_second too
    ]
    return callbacks


def write_sample_grid(features: dict, log_dir: str) -> None:
    """One image summary of a batch of training products as the model sees them: a row per
    product, a column per image slot, padded slots outlined in red, real ones in green."""
    images, mask = features["images"].numpy(), features["mask"].numpy()
    b, n, s = images.shape[:3]
    pad = 2
    grid = np.full((b * (s + 2 * pad), n * (s + 2 * pad), 3), 0, np.uint8)
    for i in range(b):
        for j in range(n):
            y, x = i * (s + 2 * pad), j * (s + 2 * pad)
            grid[y:y + s + 2 * pad, x:x + s + 2 * pad] = (0, 200, 0) if mask[i, j] > 0 else (200, 0, 0)
            grid[y + pad:y + pad + s, x + pad:x + pad + s] = images[i, j]
    writer = tf.summary.create_file_writer(os.path.join(log_dir, "samples"))
    with writer.as_default():
        tf.summary.image(
            "training_products", grid[None], step=0,
            description="rows: products; columns: image slots; red border = padding (mask 0)",
        )
    writer.close()
