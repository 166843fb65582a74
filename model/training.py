"""The training library behind train.py: one `train(config)` that reads top to bottom.

strategy -> data -> model, losses, optimizer and schedule -> callbacks -> fit -> model.keras and a
SavedModel that serves raw JPEG bytes. Tests call `train` directly; train.py only turns flags into
a `TrainConfig`.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import time
import warnings

import numpy as np
import tensorflow as tf
import keras

import record_schema
from model import input_pipeline, labels as labels_lib, multi_image

FUSIONS = ("mean_max", "mean", "max", "gated", "late")
BACKBONES = ("xception", "tiny")
PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
OPTIMIZERS = ("adamw", "sgd")

# Files inside model_dir.
FLAGS_FILE = "flags.txt"
CONFIG_FILE = "train_config.json"  # model + input settings evaluate.py needs to rebuild inputs
STATE_FILE = "train_state.json"  # written when training has finished
MODEL_FILE = "model.keras"
BEST_FILE = "best.keras"
EXPORT_DIR = "export"
BACKUP_DIR = "backup"
LOGS_DIR = "logs"

# The monitored metric: Keras prefixes metric names with the output name for dict outputs.
TOP1 = "category_top1"


@dataclasses.dataclass
class TrainConfig:
    data_dir: str
    model_dir: str
    # Model.
    backbone: str = "xception"
    fusion: str = "mean_max"
    packed: bool = True
    image_size: int = 180
    crop_size: int = 0  # 0: no random crop
    weights: str = ""  # "" or "imagenet" (for the xception backbone) or a .weights.h5 path
    dropout: float = 0.0
    bn_momentum: float = 0.99  # BatchNorm moving averages; lower for short runs
    # Schedule.
    epochs: int = 10
    batch_size: int = 256  # global: split across replicas
    steps_per_epoch: int = 0  # 0: train products // batch_size
    validation_steps: int = 0  # 0: the whole val split
    optimizer: str = "adamw"
    base_lr: float = 1e-3  # learning rate for a global batch of 256, scaled linearly
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0  # cosine decays to base * this
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd only
    label_smoothing: float = 0.1
    aux_loss_weight: float = 0.2  # level1/level2 heads when labels.csv has the tree; 0 disables
    # Execution.
    precision: str = "float32"
    jit_compile: bool = False
    steps_per_execution: int = 1
    cpu_devices: int = 0  # >1: split the CPU into that many logical devices (MirroredStrategy)
    shuffle_buffer: int = 2048
    seed: int = 0
    # Checkpoints and logs.
    bn_recalibration_steps: int = 20  # batches to re-estimate BatchNorm statistics after training
    backup_every_steps: int = 100
    profile_batches: str = ""  # "10,20": profile those training batches into logs/
    sample_products: int = 8  # products shown in the TensorBoard image grid at start
    export_top_k: int = 5
    verbose: int = 2
    seconds_per_step: float = 0.0  # test aid: sleep after every batch so a run can be killed mid-epoch

    @property
    def model_image_size(self) -> int:
        return self.crop_size or self.image_size


# ---------------------------------------------------------------------------------------------
# Strategy


def configure_cpu_devices(count: int) -> None:
    """Splits the CPU into `count` logical devices; must run before TensorFlow initialises."""
    if count <= 1:
        return
    cpus = tf.config.list_physical_devices("CPU")
    try:
        tf.config.set_logical_device_configuration(
            cpus[0], [tf.config.LogicalDeviceConfiguration() for _ in range(count)]
        )
    except RuntimeError:
        # Already initialised (for example by the tests' conftest): fine if the count matches.
        have = len(tf.config.list_logical_devices("CPU"))
        if have != count:
            raise RuntimeError(
                f"--cpu_devices={count} but TensorFlow is already initialised with {have} CPU devices"
            ) from None


def make_strategy(cpu_devices: int = 0) -> tf.distribute.Strategy:
    """MultiWorkerMirrored when TF_CONFIG is set, else Mirrored over GPUs or logical CPUs."""
    if os.environ.get("TF_CONFIG"):
        # Keras 3 model.fit under MultiWorkerMirroredStrategy is an open upstream problem
        # (keras-team/keras#20585, tensorflow/tensorflow#72388): see _patch_nested_reduce.
        return _patch_nested_reduce(tf.distribute.MultiWorkerMirroredStrategy())
    if tf.config.list_physical_devices("GPU"):  # does not initialise the runtime
        return tf.distribute.MirroredStrategy()
    configure_cpu_devices(cpu_devices)
    cpus = tf.config.list_logical_devices("CPU")
    if cpu_devices > 1:
        # Several CPU replicas reduce through one device: NCCL is GPU only.
        return tf.distribute.MirroredStrategy(
            [d.name for d in cpus[:cpu_devices]],
            cross_device_ops=tf.distribute.ReductionToOneDevice(),
        )
    return tf.distribute.MirroredStrategy([cpus[0].name])


def _patch_nested_reduce(strategy: tf.distribute.Strategy) -> tf.distribute.Strategy:
    """Lets Keras 3 fit() start under MultiWorkerMirroredStrategy.

    Before the first step, fit() (trainer._maybe_symbolic_build, Keras 3.15) pulls one input
    batch and calls strategy.reduce("MEAN", batch, axis=None) on the whole nested batch, only
    to learn its shapes. CollectiveAllReduceStrategy.reduce takes a single tensor, so it raises
    "Attempt to convert a value ({'images': PerReplica...}) ... to a Tensor" (keras-team/keras
    #20585). For a nested value this returns the first local replica's batch, which has the
    shapes Keras wants, with no collective at all.
    Then every train step reduces its scalar logs (loss, metrics) with reduce("MEAN", v, axis=0)
    when multi-worker (trainer.reduce_per_replica), which fails on a 0-d value ("Invalid
    reduction dimension 0 for input with 0 dimensions"): a scalar is reduced with axis=None.
    """
    reduce = strategy.reduce

    def nested_safe_reduce(reduce_op, value, axis=None):
        if tf.nest.is_nested(value):
            return tf.nest.map_structure(lambda v: strategy.experimental_local_results(v)[0], value)
        if axis is not None and strategy.experimental_local_results(value)[0].shape.rank == 0:
            axis = None
        return reduce(reduce_op, value, axis)

    strategy.reduce = nested_safe_reduce
    return strategy


def worker_model_dir(model_dir: str, strategy: tf.distribute.Strategy) -> str:
    """Where this process writes: model_dir for the chief (or the only worker); under
    multi-worker training the others write the same files to model_dir/workers/TYPE_ID, since
    every worker must take part in each save (they are collective) but only one may own the
    files."""
    resolver = getattr(strategy, "cluster_resolver", None)
    if resolver is None or not resolver.task_type:
        return model_dir
    cluster = resolver.cluster_spec().as_dict()
    chief = ("chief", 0) if "chief" in cluster else ("worker", 0)
    if (resolver.task_type, resolver.task_id) == chief:
        return model_dir
    return os.path.join(model_dir, "workers", f"{resolver.task_type}_{resolver.task_id}")


def num_replicas_for(cpu_devices: int) -> int:
    """Replicas the local strategy will have, known before TensorFlow builds anything."""
    gpus = tf.config.list_physical_devices("GPU")
    if gpus:
        return len(gpus)
    return max(1, cpu_devices)


# ---------------------------------------------------------------------------------------------
# Data


def read_metadata(data_dir: str) -> dict:
    with open(os.path.join(data_dir, record_schema.METADATA_FILE)) as f:
        return json.load(f)


def split_products(metadata: dict, split: str) -> int:
    return int(metadata.get("splits", {}).get(split, {}).get("products", 0))


def split_pattern(data_dir: str, split: str) -> str:
    return os.path.join(data_dir, record_schema.shard_pattern(split))


def has_split(data_dir: str, metadata: dict, split: str) -> bool:
    return split_products(metadata, split) > 0 and bool(tf.io.gfile.glob(split_pattern(data_dir, split)))


def make_targets(labels: labels_lib.Labels, aux: bool):
    """Class index -> one-hot targets per head (CategoricalCrossentropy is the one with smoothing)."""
    level1 = tf.constant(labels.level1_index)
    level2 = tf.constant(labels.level2_index)
    k1, k2 = len(labels.level1_names), len(labels.level2_names)

    def targets(features, label):
        inputs = {"images": features["images"], "mask": features["mask"]}
        y = {"category": tf.one_hot(label, labels.num_classes)}
        if aux:
            y["level1"] = tf.one_hot(tf.gather(level1, label), k1)
            y["level2"] = tf.one_hot(tf.gather(level2, label), k2)
        return inputs, y

    return targets


def train_dataset(cfg: TrainConfig, strategy, targets):
    """Per-replica pipelines: each replica reads its own batch (global batch / replicas)."""

    def dataset_fn(input_context: tf.distribute.InputContext):
        ds = input_pipeline.create_dataset(
            split_pattern(cfg.data_dir, "train"),
            batch_size=input_context.get_per_replica_batch_size(cfg.batch_size),
            training=True,
            image_size=cfg.image_size,
            crop_size=cfg.crop_size or None,
            shuffle_buffer=cfg.shuffle_buffer,
            seed=cfg.seed,
            input_context=input_context,
            repeat=True,  # fit counts steps_per_epoch; the stream never ends mid-epoch
        )
        return ds.map(targets, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    return strategy.distribute_datasets_from_function(dataset_fn)


def eval_dataset(cfg: TrainConfig, split: str, targets):
    # A plain dataset of global batches: Keras distributes it, and handles the short last batch.
    ds = input_pipeline.create_dataset(
        split_pattern(cfg.data_dir, split),
        batch_size=cfg.batch_size,
        training=False,
        image_size=cfg.image_size,
        crop_size=cfg.crop_size or None,
    )
    # Multi-worker: every worker evaluates the same batches. Redundant, but exact, and valid for
    # a val split of one file (AUTO sharding would demand a file per worker).
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    ds = ds.with_options(options)
    return ds.map(targets, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)


# ---------------------------------------------------------------------------------------------
# Model, losses, optimizer


def model_config(cfg: TrainConfig, labels: labels_lib.Labels, aux: bool) -> multi_image.ModelConfig:
    return multi_image.ModelConfig(
        num_classes=labels.num_classes,
        num_level1=len(labels.level1_names) if aux else 0,
        num_level2=len(labels.level2_names) if aux else 0,
        image_size=cfg.model_image_size,
        backbone=cfg.backbone,
        fusion=cfg.fusion,
        packed=cfg.packed,
        weights=cfg.weights or None,
        dropout=cfg.dropout,
        bn_momentum=cfg.bn_momentum,
        max_images=record_schema.MAX_IMAGES,
    )


def learning_rate_schedule(cfg: TrainConfig, steps_per_epoch: int):
    """Linear warmup to base_lr * batch/256, then cosine decay over the remaining steps."""
    peak = cfg.base_lr * cfg.batch_size / 256.0
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else peak,
        decay_steps=max(1, total - warmup),
        alpha=cfg.min_lr_ratio,
        warmup_target=peak if warmup else None,
        warmup_steps=warmup,
    )


def make_optimizer(cfg: TrainConfig, schedule) -> keras.optimizers.Optimizer:
    if cfg.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        # Keras 3 applies weight_decay decoupled (like AdamW) for every optimizer.
        optimizer = keras.optimizers.SGD(
            learning_rate=schedule, momentum=cfg.momentum, nesterov=True,
            weight_decay=cfg.weight_decay or None,
        )
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}: use one of {OPTIMIZERS}")
    # Decaying BatchNorm scales/offsets and biases only fights the normalisation.
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


def compile_model(model: keras.Model, cfg: TrainConfig, optimizer, aux: bool) -> None:
    ce = lambda: keras.losses.CategoricalCrossentropy(  # noqa: E731
        from_logits=True, label_smoothing=cfg.label_smoothing
    )
    losses = {"category": ce()}
    weights = {"category": 1.0}
    if aux:
        losses.update(level1=ce(), level2=ce())
        weights.update(level1=cfg.aux_loss_weight, level2=cfg.aux_loss_weight)
    model.compile(
        optimizer=optimizer,
        loss=losses,
        loss_weights=weights,
        metrics={
            "category": [
                keras.metrics.CategoricalAccuracy(name="top1"),
                keras.metrics.TopKCategoricalAccuracy(k=5, name="top5"),
            ]
        },
        jit_compile=cfg.jit_compile,
        steps_per_execution=cfg.steps_per_execution,
    )


# ---------------------------------------------------------------------------------------------
# Callbacks


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


class SlowSteps(keras.callbacks.Callback):
    def __init__(self, seconds: float):
        super().__init__()
        self.seconds = seconds

    def on_train_batch_end(self, batch, logs=None):
        time.sleep(self.seconds)


def write_sample_grid(cfg: TrainConfig, log_dir: str) -> None:
    """One image summary of training products as the model sees them: a row per product,
    a column per image slot, padded slots outlined in red, real ones in green."""
    if cfg.sample_products <= 0:
        return
    ds = input_pipeline.create_dataset(
        split_pattern(cfg.data_dir, "train"), batch_size=cfg.sample_products, training=True,
        image_size=cfg.image_size, crop_size=cfg.crop_size or None, shuffle_buffer=64, seed=cfg.seed,
    )
    features, _ = next(iter(ds))
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


def make_callbacks(cfg: TrainConfig, has_val: bool, steps_per_epoch: int) -> list:
    model_dir = cfg.model_dir
    backup_dir = os.path.join(model_dir, BACKUP_DIR)
    callbacks = [
        keras.callbacks.TerminateOnNaN(),
        # Restores weights, optimizer state (iterations included) and the epoch on re-run. Kept
        # after fit (delete_checkpoint=False) and removed only once model.keras and export/ exist,
        # so a kill at any moment leaves something to resume from.
        keras.callbacks.BackupAndRestore(
            backup_dir, save_freq=max(1, cfg.backup_every_steps), delete_checkpoint=False
        ),
        ResumeReport(backup_dir, cfg.epochs),
        Throughput(cfg.batch_size),
    ]
    if cfg.seconds_per_step > 0:
        callbacks.append(SlowSteps(cfg.seconds_per_step))
    if has_val:
        callbacks.append(
            keras.callbacks.ModelCheckpoint(
                os.path.join(model_dir, BEST_FILE), monitor=f"val_{TOP1}", mode="max",
                save_best_only=True,
            )
        )
    profile = tuple(int(b) for b in cfg.profile_batches.split(",")) if cfg.profile_batches else 0
    callbacks += [
        # Epoch-level scalars: loss, top-1/top-5, learning rate, products/s (Throughput runs first
        # and adds it to the same logs dict).
        keras.callbacks.TensorBoard(
            os.path.join(model_dir, LOGS_DIR), profile_batch=profile, write_graph=False
        ),
        EpochProgress(),  # last, so its end-of-epoch line shows products_per_second too
    ]
    return callbacks


# ---------------------------------------------------------------------------------------------
# Export


def export_serving_model(model: keras.Model, labels: labels_lib.Labels, path: str, *, image_size: int,
                         crop_size: int = 0, top_k: int = 5) -> None:
    """SavedModel whose default signature maps raw JPEG bytes to the top-k category ids.

    serving_default(images: string [B, 4], mask: float32 [B, 4]) ->
        {"category_ids": int64 [B, k], "probabilities": float32 [B, k], "classes": int32 [B, k]}
    Decoding is the input pipeline's own function, so serving sees exactly what training saw.
    """
    top_k = min(top_k, labels.num_classes)
    category_ids = tf.constant(labels.category_ids, dtype=tf.int64)
    n = record_schema.MAX_IMAGES

    def serve(images, mask):
        # The evaluation decoding of the input pipeline: resize to image_size, centre crop_size.
        decoded = input_pipeline.decode_images(images, mask, image_size, crop_size=crop_size or None)
        logits = model({"images": decoded, "mask": mask}, training=False)["category"]
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32))
        top = tf.math.top_k(probabilities, k=top_k)
        return {
            "category_ids": tf.gather(category_ids, top.indices),
            "probabilities": top.values,
            "classes": top.indices,
        }

    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve",  # the first endpoint is also written as serving_default
        serve,
        input_signature=[
            tf.TensorSpec([None, n], tf.string, name="images"),
            tf.TensorSpec([None, n], tf.float32, name="mask"),
        ],
    )
    if tf.io.gfile.exists(path):
        tf.io.gfile.rmtree(path)
    archive.write_out(path, verbose=False)


# ---------------------------------------------------------------------------------------------
# The training run


def train(cfg: TrainConfig) -> dict:
    """Trains (or resumes) into cfg.model_dir; returns the final state written to train_state.json."""
    model_dir = cfg.model_dir
    os.makedirs(model_dir, exist_ok=True)
    state_path = os.path.join(model_dir, STATE_FILE)
    if os.path.exists(state_path) and os.path.exists(os.path.join(model_dir, MODEL_FILE)):
        with open(state_path) as f:
            state = json.load(f)
        if state.get("epochs") == cfg.epochs:
            print(f"{model_dir} already holds a finished run of {cfg.epochs} epochs; nothing to do.")
            return state

    strategy = make_strategy(cfg.cpu_devices)
    if worker_model_dir(model_dir, strategy) != model_dir:
        cfg = dataclasses.replace(cfg, model_dir=worker_model_dir(model_dir, strategy))
        model_dir = cfg.model_dir
        os.makedirs(model_dir, exist_ok=True)
    replicas = strategy.num_replicas_in_sync
    if cfg.batch_size % replicas:
        raise ValueError(
            f"--batch_size={cfg.batch_size} is not divisible by the {replicas} replicas: "
            f"use a multiple of {replicas}"
        )
    keras.config.set_dtype_policy(cfg.precision)

    # Data: the sizes come from metadata.json, the classes and the tree from labels.csv.
    metadata = read_metadata(cfg.data_dir)
    labels = labels_lib.read_labels(cfg.data_dir)
    aux = labels.has_hierarchy and cfg.aux_loss_weight > 0
    train_products = split_products(metadata, "train")
    steps_per_epoch = cfg.steps_per_epoch or train_products // cfg.batch_size
    if steps_per_epoch < 1:
        raise ValueError(
            f"{train_products} training products make no full batch of {cfg.batch_size}: "
            "lower --batch_size or set --steps_per_epoch"
        )
    targets = make_targets(labels, aux)
    train_ds = train_dataset(cfg, strategy, targets)
    has_val = has_split(cfg.data_dir, metadata, "val")
    # Validation is a finite dataset and fit is NOT told its length: with a step count, Keras
    # 3.15 evaluate() pulls a batch from its cached iterator before resetting it, and under a
    # distribution strategy that is the exhausted iterator of the previous pass (StopIteration
    # at the second validation); and steps_per_execution > 1 rounds a count up past the end.
    # A shorter validation is a take() of the batches instead.
    val_ds = eval_dataset(cfg, "val", targets) if has_val else None
    if val_ds is not None and cfg.validation_steps:
        val_ds = val_ds.take(cfg.validation_steps)
    # Keras says this after every complete pass over a dataset of unknown length; the training
    # stream is infinite, so it can only be about validation, where it means nothing.
    warnings.filterwarnings("ignore", message="Your input ran out of data")
    print(
        f"{replicas} replica(s) ({strategy.__class__.__name__}); {train_products} training products, "
        f"{labels.num_classes} classes{' + level1/level2 heads' if aux else ''}; "
        f"global batch {cfg.batch_size}, {steps_per_epoch} steps x {cfg.epochs} epochs",
        flush=True,
    )
    if not has_val:
        print(f"No val split in {cfg.data_dir}: training without validation.", flush=True)

    # Model: built and compiled under the strategy so variables are mirrored on every replica.
    mconfig = model_config(cfg, labels, aux)
    # evaluate.py maps class indices back to category ids with the model's own copy.
    shutil.copy(os.path.join(cfg.data_dir, record_schema.LABELS_FILE), os.path.join(model_dir, record_schema.LABELS_FILE))
    with open(os.path.join(model_dir, CONFIG_FILE), "w") as f:
        json.dump({"model": dataclasses.asdict(mconfig), "train": dataclasses.asdict(cfg)}, f, indent=1)
    with strategy.scope():
        model = multi_image.build_model(mconfig)
        optimizer = make_optimizer(cfg, learning_rate_schedule(cfg, steps_per_epoch))
        compile_model(model, cfg, optimizer, aux)

    log_dir = os.path.join(model_dir, LOGS_DIR)
    write_sample_grid(cfg, log_dir)
    callbacks = make_callbacks(cfg, has_val, steps_per_epoch)
    try:
        history = model.fit(
            train_ds,
            epochs=cfg.epochs,
            steps_per_epoch=steps_per_epoch,
            validation_data=val_ds,
            callbacks=callbacks,
            verbose=cfg.verbose,
            shuffle=False,  # the pipeline shuffles; Keras cannot shuffle a tf.data stream anyway
        )
    except Exception as e:
        if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
            raise RuntimeError(
                "model.fit failed under MultiWorkerMirroredStrategy (TF_CONFIG is set). Keras 3 has "
                "open issues there (keras-team/keras#20585, tensorflow/tensorflow#72388); the two met "
                "with Keras 3.15 are worked around (_patch_nested_reduce), this one is not. Unset "
                f"TF_CONFIG to train on this machine's devices. Original error: {e}"
            ) from e
        raise
    if model.stop_training and any(
        not math.isfinite(v[-1]) for v in history.history.values() if v
    ):
        raise RuntimeError("training stopped on a NaN loss; backup/ is kept, lower --base_lr")

    # The final model: a plain copy outside the strategy (what evaluation and serving load), its
    # BatchNorm statistics recalibrated on training batches, measured once more on val.
    final = multi_image.build_model(mconfig)
    final.set_weights(model.get_weights())
    calibration = input_pipeline.create_dataset(
        split_pattern(cfg.data_dir, "train"), batch_size=cfg.batch_size, training=True,
        image_size=cfg.image_size, crop_size=cfg.crop_size or None, seed=cfg.seed, repeat=True,
    )
    recalibrated = recalibrate_batchnorm(final, calibration, cfg.bn_recalibration_steps)
    final_val = {}
    if has_val:
        compile_model(final, cfg, keras.optimizers.SGD(), aux)  # for evaluate(); never trained
        final_val = final.evaluate(val_ds, return_dict=True, verbose=0)
        print(
            f"Final model (BatchNorm recalibrated on {recalibrated} batches): val top-1 "
            f"{final_val[TOP1]:.4f}, top-5 {final_val['category_top5']:.4f}",
            flush=True,
        )

    # Final artefacts, then drop the backup: from here a re-run has nothing left to do.
    final.save(os.path.join(model_dir, MODEL_FILE))
    export_serving_model(final, labels, os.path.join(model_dir, EXPORT_DIR), image_size=cfg.image_size,
                         crop_size=cfg.crop_size, top_k=cfg.export_top_k)
    resume = next(c for c in callbacks if isinstance(c, ResumeReport))
    state = {
        "epochs": cfg.epochs,
        "steps_per_epoch": steps_per_epoch,
        "optimizer_iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "resumed_epoch": resume.resumed_epoch,
        "resumed_step": resume.resumed_step,
        "bn_recalibration_batches": recalibrated,
        "final": {k: float(v[-1]) for k, v in history.history.items() if v},
        "final_val": {k: float(v) for k, v in final_val.items()},
    }
    with open(state_path, "w") as f:
        json.dump(state, f, indent=1)
    shutil.rmtree(os.path.join(model_dir, BACKUP_DIR), ignore_errors=True)
    print(f"Saved {os.path.join(model_dir, MODEL_FILE)} and the SavedModel {os.path.join(model_dir, EXPORT_DIR)}")
    return state


def recalibrate_batchnorm(model: keras.Model, dataset, steps: int) -> int:
    """Replaces every BatchNorm layer's moving mean/variance by the average of its batch
    statistics over `steps` training batches, with the weights frozen ("precise BN").

    Why: the moving averages (momentum 0.99) trail the weights by ~100 steps; in a short run at a
    high learning rate they describe a network that no longer exists, and inference accuracy can
    sit near chance while training accuracy is high. Runs eagerly so the momentum can change per
    batch (1 - 1/i makes the moving value the plain mean of the i batches seen).
    """
    layers = [l for l in _all_layers(model) if isinstance(l, keras.layers.BatchNormalization)]
    if not layers or steps <= 0:
        return 0
    saved = [l.momentum for l in layers]
    seen = 0
    try:
        for i, (inputs, _) in enumerate(dataset.take(steps), start=1):
            for layer in layers:
                layer.momentum = 1.0 - 1.0 / i
            # training=True: batch statistics, and the moving ones updated; no gradients taken.
            model({"images": inputs["images"], "mask": inputs["mask"]}, training=True)
            seen = i
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum
    return seen


def _all_layers(model):
    for layer in model._flatten_layers(include_self=False, recursive=True):
        yield layer
