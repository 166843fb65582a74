"""The training library behind train.py: one `train(config)` that reads top to bottom.

strategy -> data -> model, losses, optimizer and schedule -> callbacks -> fit -> model.keras and a
SavedModel that serves raw JPEG bytes. Tests call `train` directly; train.py only turns flags into
a `TrainConfig`. Where it runs is model/distribution.py, what it reports model/callbacks.py, what
it exports model/export.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import shutil
import warnings

import keras
import tensorflow as tf

import record_schema
from model import callbacks as callbacks_lib
from model import data_folder, distribution, export, input_pipeline, multi_image
from model import labels as labels_lib
from model import model_dir as model_dir_lib

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
OPTIMIZERS = ("adamw", "sgd")
TOP1 = callbacks_lib.TOP1


@dataclasses.dataclass
class TrainConfig:
    data_dir: str
    model_dir: str
    # Model.
    backbone: str = "xception"
    fusion: str = "mean_max"
    packed: bool = True
    image_size: int = record_schema.IMAGE_SIZE
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

    @property
    def model_image_size(self) -> int:
        return self.crop_size or self.image_size


def config_from_json(values: dict) -> TrainConfig:
    """The TrainConfig saved in train_config.json["train"]; keys no longer known are ignored."""
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{name: value for name, value in values.items() if name in known})


# ---------------------------------------------------------------------------------------------
# Data


def split_dataset(cfg: TrainConfig, split: str, *, training: bool, batch_size: int, **options) -> tf.data.Dataset:
    """create_dataset over one split of cfg.data_dir, with the config's image settings."""
    return input_pipeline.create_dataset(
        data_folder.split_pattern(cfg.data_dir, split), batch_size=batch_size, training=training,
        image_size=cfg.image_size, crop_size=cfg.crop_size or None, **options,
    )


def has_split(data_dir: str, metadata: dict, split: str) -> bool:
    return (data_folder.split_products(metadata, split) > 0
            and bool(tf.io.gfile.glob(data_folder.split_pattern(data_dir, split))))


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
        ds = split_dataset(
            cfg, "train", training=True,
            batch_size=input_context.get_per_replica_batch_size(cfg.batch_size),
            shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, input_context=input_context,
            repeat=True,  # fit counts steps_per_epoch; the stream never ends mid-epoch
        )
        return ds.map(targets, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    return strategy.distribute_datasets_from_function(dataset_fn)


def eval_dataset(cfg: TrainConfig, split: str, targets):
    # A plain dataset of global batches: Keras distributes it, and handles the short last batch.
    ds = split_dataset(cfg, split, training=False, batch_size=cfg.batch_size)
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
# The training run


def train(cfg: TrainConfig, extra_callbacks: tuple = ()) -> dict:
    """Trains (or resumes) into cfg.model_dir; returns the final state written to train_state.json.

    extra_callbacks: Keras callbacks to run besides the built-in ones (after them).
    """
    model_dir = cfg.model_dir
    os.makedirs(model_dir, exist_ok=True)
    state_path = os.path.join(model_dir, model_dir_lib.STATE_FILE)
    if os.path.exists(state_path) and os.path.exists(os.path.join(model_dir, model_dir_lib.MODEL_FILE)):
        with open(state_path) as f:
            state = json.load(f)
        if state.get("epochs") == cfg.epochs:
            print(f"{model_dir} already holds a finished run of {cfg.epochs} epochs; nothing to do.")
            return state

    strategy = distribution.make_strategy(cfg.cpu_devices)
    if distribution.worker_model_dir(model_dir, strategy) != model_dir:
        cfg = dataclasses.replace(cfg, model_dir=distribution.worker_model_dir(model_dir, strategy))
        model_dir = cfg.model_dir
        os.makedirs(model_dir, exist_ok=True)
    replicas = strategy.num_replicas_in_sync
    distribution.check_batch_divisible(cfg.batch_size, replicas)
    keras.config.set_dtype_policy(cfg.precision)

    # Data: the sizes come from metadata.json, the classes and the tree from labels.csv.
    metadata = data_folder.read_metadata(cfg.data_dir)
    labels = labels_lib.read_labels(cfg.data_dir)
    aux = labels.has_hierarchy and cfg.aux_loss_weight > 0
    train_products = data_folder.split_products(metadata, "train")
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
    with open(os.path.join(model_dir, model_dir_lib.CONFIG_FILE), "w") as f:
        json.dump({"model": dataclasses.asdict(mconfig), "train": dataclasses.asdict(cfg)}, f, indent=1)
    with strategy.scope():
        model = multi_image.build_model(mconfig)
        optimizer = make_optimizer(cfg, learning_rate_schedule(cfg, steps_per_epoch))
        compile_model(model, cfg, optimizer, aux)

    if cfg.sample_products > 0:
        samples = split_dataset(cfg, "train", training=True, batch_size=cfg.sample_products,
                                shuffle_buffer=64, seed=cfg.seed)
        callbacks_lib.write_sample_grid(next(iter(samples))[0], os.path.join(model_dir, model_dir_lib.LOGS_DIR))
    callbacks = callbacks_lib.make_callbacks(
        model_dir, epochs=cfg.epochs, global_batch=cfg.batch_size, backup_every_steps=cfg.backup_every_steps,
        profile_batches=cfg.profile_batches, has_val=has_val,
    ) + list(extra_callbacks)
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
        if distribution.is_multi_worker(strategy):
            raise RuntimeError(
                "model.fit failed under MultiWorkerMirroredStrategy (TF_CONFIG is set). Keras 3 has "
                "open issues there (keras-team/keras#20585, tensorflow/tensorflow#72388); the two met "
                "with Keras 3.15 are worked around (model/distribution.py), this one is not. Unset "
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
    calibration = split_dataset(cfg, "train", training=True, batch_size=cfg.batch_size, seed=cfg.seed,
                                repeat=True)
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
    model_path = os.path.join(model_dir, model_dir_lib.MODEL_FILE)
    export_path = os.path.join(model_dir, model_dir_lib.EXPORT_DIR)
    final.save(model_path)
    export.export_serving_model(final, labels, export_path, image_size=cfg.image_size,
                                crop_size=cfg.crop_size, top_k=cfg.export_top_k)
    resume = next(c for c in callbacks if isinstance(c, callbacks_lib.ResumeReport))
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
    shutil.rmtree(os.path.join(model_dir, model_dir_lib.BACKUP_DIR), ignore_errors=True)
    print(f"Saved {model_path} and the SavedModel {export_path}")
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
