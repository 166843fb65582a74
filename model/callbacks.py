"""What training reports and keeps while it runs: Keras callbacks and the TensorBoard sample grid."""

from __future__ import annotations

import os
import time

import keras
import numpy as np
import tensorflow as tf

from model import model_dir as model_dir_lib

# The monitored metric: Keras prefixes metric names with the output name for dict outputs.
TOP1 = "category_top1"


class EpochProgress(keras.callbacks.ProgbarLogger):
    """Keras' progress logger, but `Epoch N/M` is printed even when M == 1 (Keras skips it)."""

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


class ResumeReport(keras.callbacks.Callback):
    """Says where training resumes after BackupAndRestore has loaded its state (runs after it)."""

    def __init__(self, backup_dir: str, epochs: int):
        super().__init__()
        self.backup_dir, self.epochs = backup_dir, epochs
        self.resumed_epoch, self.resumed_step = 0, 0

    def on_train_begin(self, logs=None):
        step = int(keras.ops.convert_to_numpy(self.model.optimizer.iterations))
        epoch = self.model._initial_epoch or 0  # set by BackupAndRestore when it restored
        if step or epoch:
            self.resumed_epoch, self.resumed_step = epoch, step
            print(
                f"Resuming from {self.backup_dir}: epoch {epoch + 1}/{self.epochs}, "
                f"optimizer step {step}",
                flush=True,
            )


def make_callbacks(model_dir: str, *, epochs: int, global_batch: int, backup_every_steps: int,
                   profile_batches: str, has_val: bool) -> list:
    backup_dir = os.path.join(model_dir, model_dir_lib.BACKUP_DIR)
    callbacks = [
        keras.callbacks.TerminateOnNaN(),
        # Restores weights, optimizer state (iterations included) and the epoch on re-run. Kept
        # after fit (delete_checkpoint=False) and removed only once model.keras and export/ exist,
        # so a kill at any moment leaves something to resume from.
        keras.callbacks.BackupAndRestore(
            backup_dir, save_freq=max(1, backup_every_steps), delete_checkpoint=False
        ),
        ResumeReport(backup_dir, epochs),
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
        EpochProgress(),  # last, so its end-of-epoch line shows products_per_second too
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
