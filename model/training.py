"""The training library behind train.py: one `train(config)` that reads top to bottom.

Over 400 lines: the train loop plus what only it uses (resume arithmetic, the earlier-run check, the final model); a split would make the loop jump between files.

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
import warnings

import keras
import tensorflow as tf

import record_schema
from model import callbacks as callbacks_lib
from model import cli, data_folder, data_service, distribution, export, input_pipeline, multi_image
from model import optimization, shards, visuals
from model import labels as labels_lib
from model import model_dir as model_dir_lib

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
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
    flip: bool = True  # random left-right mirror of each image in training, inside the model
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
    skip_corrupt_records: bool = False  # read past damaged shards (the rest of each file), counted
    data_service: str = ""  # grpc://HOST:PORT: the training stream runs on tf.data service workers
    # Checkpoints and logs.
    bn_recalibration_steps: int = 20  # batches to re-estimate BatchNorm statistics after training
    backup_every_steps: int = 100
    log_every_steps: int = 100  # step-level scalars in TensorBoard; 0: epoch-level only
    profile_batches: str = ""  # "10,20": profile those optimizer steps into logs/train
    expect_gpus: bool = False  # a GPU configuration: warn when none is visible
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
    if cfg.skip_corrupt_records:
        options.setdefault("skip_corrupt_records", True)
    return input_pipeline.create_dataset(
        data_folder.split_pattern(cfg.data_dir, split), batch_size=batch_size, training=training,
        image_size=cfg.image_size, crop_size=cfg.crop_size or None, **options,
    )


def has_split(data_dir: str, metadata: dict, split: str) -> bool:
    return (data_folder.split_products(metadata, split) > 0
            and bool(tf.io.gfile.glob(data_folder.split_pattern(data_dir, split))))


def auxiliary_heads(labels: labels_lib.Labels, weight: float) -> dict:
    """{"level1": classes, "level2": classes} of the category tree's levels worth a head: a level
    with one class has nothing to learn (its loss is 0) and gets none."""
    if weight <= 0:
        return {}
    sizes = {"level1": len(labels.level1_names), "level2": len(labels.level2_names)}
    return {name: size for name, size in sizes.items() if size > 1}


def make_targets(labels: labels_lib.Labels, aux_heads: dict):
    """Class index -> one-hot targets per head (CategoricalCrossentropy is the one with smoothing)."""
    level_index = {"level1": tf.constant(labels.level1_index), "level2": tf.constant(labels.level2_index)}

    def targets(features, label):
        inputs = {"images": features["images"], "mask": features["mask"]}
        y = {"category": tf.one_hot(label, labels.num_classes)}
        for name, classes in aux_heads.items():
            y[name] = tf.one_hot(tf.gather(level_index[name], label), classes)
        return inputs, y

    return targets


def train_dataset(cfg: TrainConfig, strategy, targets, service_job: str = ""):
    """Per-replica pipelines: each replica reads its own batch (global batch / replicas).

    With cfg.data_service the pipeline runs on the service's workers under dynamic sharding, and
    every replica of every trainer reads one shared job (`service_job`, see data_service)."""

    def dataset_fn(input_context: tf.distribute.InputContext):
        batch_size = input_context.get_per_replica_batch_size(cfg.batch_size)
        ds = split_dataset(
            cfg, "train", training=True, batch_size=batch_size,
            shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed, input_context=input_context,
            repeat=True,  # fit counts steps_per_epoch; the stream never ends mid-epoch
            **({"dynamic_sharding": True} if cfg.data_service else {}),
        )
        if cfg.data_service:
            ds = data_service.distribute(ds, cfg.data_service, job_name=f"{service_job}-b{batch_size}")
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
# Model


def model_config(cfg: TrainConfig, labels: labels_lib.Labels, aux_heads: dict) -> multi_image.ModelConfig:
    return multi_image.ModelConfig(
        num_classes=labels.num_classes,
        num_level1=aux_heads.get("level1", 0),
        num_level2=aux_heads.get("level2", 0),
        image_size=cfg.model_image_size,
        backbone=cfg.backbone,
        fusion=cfg.fusion,
        packed=cfg.packed,
        weights=cfg.weights or None,
        dropout=cfg.dropout,
        bn_momentum=cfg.bn_momentum,
        max_images=record_schema.MAX_IMAGES,
        flip=cfg.flip,
        seed=cfg.seed,
    )


# ---------------------------------------------------------------------------------------------
# The training run


# Settings that do not change what a run computes: a resumed or finished run may differ in them.
RUN_INDEPENDENT = frozenset({"model_dir", "verbose", "profile_batches", "sample_products", "backup_every_steps",
                             "export_top_k", "cpu_devices", "shuffle_buffer", "steps_per_execution",
                             "log_every_steps", "expect_gpus",
                             "skip_corrupt_records", "data_service"})


def settings_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """The settings of a saved train_config.json["train"] that differ from cfg, as flags."""
    return [f"--{name}={saved[name]} (now {value})" for name, value in dataclasses.asdict(cfg).items()
            if name not in RUN_INDEPENDENT and name in saved and saved[name] != value]


def align_to_executions(steps_per_epoch: int, steps_per_execution: int) -> tuple[int, int]:
    """(steps_per_epoch, steps_per_execution) such that an epoch is whole executions.

    Keras runs whole executions: an epoch that is not a multiple of steps_per_execution silently
    runs more steps than asked (an epoch of 4 steps runs 20 at steps_per_execution=20). So a
    shorter epoch lowers steps_per_execution, and a longer one rounds down to a multiple; each
    change is said once.
    """
    if steps_per_epoch < steps_per_execution:
        print(f"steps_per_execution lowered from {steps_per_execution} to {steps_per_epoch}: an epoch has "
              f"only {steps_per_epoch} steps", flush=True)
        return steps_per_epoch, steps_per_epoch
    if steps_per_epoch % steps_per_execution:
        rounded = steps_per_epoch - steps_per_epoch % steps_per_execution
        print(f"steps_per_epoch rounded down from {steps_per_epoch} to {rounded}, a multiple of "
              f"steps_per_execution={steps_per_execution} (Keras runs whole executions)", flush=True)
        return rounded, steps_per_execution
    return steps_per_epoch, steps_per_execution


def check_earlier_run(model_dir: str, cfg: TrainConfig) -> dict | None:
    """The state of a finished run of this config in model_dir (None if there is none to reuse).

    A finished or interrupted run made with other settings stops here with one line: resuming it
    would mix two runs, and starting over would destroy it.
    """
    config_path = os.path.join(model_dir, model_dir_lib.CONFIG_FILE)
    state_path = os.path.join(model_dir, model_dir_lib.STATE_FILE)
    exists = tf.io.gfile.exists
    finished = exists(state_path) and exists(os.path.join(model_dir, model_dir_lib.MODEL_FILE))
    interrupted = exists(os.path.join(model_dir, model_dir_lib.BACKUP_DIR, callbacks_lib.BACKUP_WEIGHTS))
    if not (finished or interrupted) or not exists(config_path):
        return None
    with tf.io.gfile.GFile(config_path) as f:
        differences = settings_differences(json.load(f)["train"], cfg)
    if differences:
        kind = "a finished" if finished else "an interrupted"
        raise cli.UserError(f"{model_dir} holds {kind} run with other settings: {'; '.join(differences)}. "
                            "Use another --model_dir, or the same settings to "
                            + ("reuse it" if finished else "resume it"))
    if not finished:
        return None
    with tf.io.gfile.GFile(state_path) as f:
        return json.load(f)


def train(cfg: TrainConfig, extra_callbacks: tuple = (), flags_text: str = "") -> dict:
    """Trains (or resumes) into cfg.model_dir; returns the final state written to train_state.json.

    extra_callbacks: Keras callbacks to run besides the built-in ones (after them).
    flags_text: the command's flags, kept in model_dir/flags.txt beside train_config.json.
    A damaged shard met while training stops it with a cli.UserError naming the file (the backup
    keeps what was trained); with cfg.skip_corrupt_records it is read past instead, and counted.
    """
    try:
        return _train(cfg, extra_callbacks, flags_text)
    except tf.errors.DataLossError as error:
        # TensorFlow's message names no file: find it, which raises the one-line error.
        for split in ("train", "val"):
            if tf.io.gfile.glob(data_folder.split_pattern(cfg.data_dir, split)):
                shards.check_split(cfg.data_dir, split, skip_corrupt_records=False)
        raise cli.UserError(f"{cfg.data_dir}: damaged record ({error.message.strip()})") from None


def _train(cfg: TrainConfig, extra_callbacks: tuple, flags_text: str) -> dict:
    model_dir = cfg.model_dir
    tf.io.gfile.makedirs(model_dir)
    finished = check_earlier_run(model_dir, cfg)
    if finished is not None:
        print(f"{model_dir} already holds a finished run of these settings ({cfg.epochs} epochs); nothing to do.")
        return finished
    # One tf.data service job for every replica and trainer of this run (model_dir as given: the
    # other workers write elsewhere), another for another run or other data settings.
    service_job = data_service.job_name_for(model_dir, cfg.data_dir, cfg.image_size, cfg.crop_size, cfg.seed,
                                            cfg.shuffle_buffer)

    strategy = distribution.make_strategy(cfg.cpu_devices)
    if distribution.worker_model_dir(model_dir, strategy) != model_dir:
        cfg = dataclasses.replace(cfg, model_dir=distribution.worker_model_dir(model_dir, strategy))
        model_dir = cfg.model_dir
        tf.io.gfile.makedirs(model_dir)
    replicas = strategy.num_replicas_in_sync
    distribution.check_batch_divisible(cfg.batch_size, replicas)
    if cfg.expect_gpus and not tf.config.list_logical_devices("GPU"):
        print("WARNING: this is a GPU configuration (--expect_gpus) but TensorFlow sees no GPU: training on the "
              "CPU. Install a GPU build of TensorFlow (README: GPUs) or drop --expect_gpus.", flush=True)
    keras.config.set_dtype_policy(cfg.precision)

    # Data: the sizes come from metadata.json, the classes and the tree from labels.csv.
    metadata = data_folder.read_metadata(cfg.data_dir)
    labels = labels_lib.read_labels(cfg.data_dir)
    aux_heads = auxiliary_heads(labels, cfg.aux_loss_weight)
    train_products = data_folder.split_products(metadata, "train")
    if train_products < 1 or not has_split(cfg.data_dir, metadata, "train"):
        raise cli.UserError(f"{cfg.data_dir} has no training products (metadata.json: {train_products}, "
                            f"shards: {data_folder.split_pattern(cfg.data_dir, 'train')})")
    has_val = has_split(cfg.data_dir, metadata, "val")
    skipped = {}
    if cfg.skip_corrupt_records:  # one read of the shards first, to name and count what is lost
        for split in ("train", "val") if has_val else ("train",):
            check = shards.check_split(cfg.data_dir, split, skip_corrupt_records=True)
            skipped[split] = check.unreadable
        train_products -= skipped["train"]
    steps_per_epoch, steps_per_execution = align_to_executions(
        cfg.steps_per_epoch or max(1, train_products // cfg.batch_size), cfg.steps_per_execution)
    cfg = dataclasses.replace(cfg, steps_per_execution=steps_per_execution)
    targets = make_targets(labels, aux_heads)
    if cfg.data_service:
        # Before the dataset is registered: with no dispatcher that would block without a word.
        workers = data_service.wait_for_workers(cfg.data_service)
        print(f"Training input from the tf.data service at {cfg.data_service}: {len(workers)} worker(s)", flush=True)
        data_service.watch_workers(cfg.data_service)
    train_ds = train_dataset(cfg, strategy, targets, service_job)
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
    heads = "".join(f" + {name} head ({classes})" for name, classes in aux_heads.items())
    print(
        f"{distribution.describe(strategy)}; {train_products} training products, "
        f"{labels.num_classes} classes{heads}; "
        f"global batch {cfg.batch_size}, {steps_per_epoch} steps x {cfg.epochs} epochs",
        flush=True,
    )
    if train_products < cfg.batch_size:
        print(f"The train split has {train_products} products, fewer than one global batch of {cfg.batch_size}: "
              "batches repeat products.", flush=True)
    if cfg.aux_loss_weight > 0:
        for name in ("level1", "level2"):
            if name not in aux_heads:
                print(f"No {name} head: labels.csv has one {name} class.", flush=True)
    if not has_val:
        print(f"No val split in {cfg.data_dir}: training without validation.", flush=True)

    # Model: built and compiled under the strategy so variables are mirrored on every replica.
    mconfig = model_config(cfg, labels, aux_heads)
    # evaluate.py maps class indices back to category ids with the model's own copy.
    tf.io.gfile.copy(os.path.join(cfg.data_dir, record_schema.LABELS_FILE),
                     os.path.join(model_dir, record_schema.LABELS_FILE), overwrite=True)
    with tf.io.gfile.GFile(os.path.join(model_dir, model_dir_lib.CONFIG_FILE), "w") as f:
        json.dump({"model": dataclasses.asdict(mconfig), "train": dataclasses.asdict(cfg)}, f, indent=1)
    if flags_text:
        with tf.io.gfile.GFile(os.path.join(model_dir, model_dir_lib.FLAGS_FILE), "w") as f:
            f.write(flags_text)
    backup_dir = os.path.join(model_dir, model_dir_lib.BACKUP_DIR)
    with strategy.scope():
        model = multi_image.build_model(mconfig)
        optimizer = optimization.make_optimizer(cfg, optimization.learning_rate_schedule(cfg, steps_per_epoch))
        optimization.compile_model(model, cfg, optimizer, aux_heads)
        resumed_step = callbacks_lib.restore_backup(model, backup_dir)
    # The optimizer's step count is the run's position: the epoch, and the steps left in it.
    resumed_epoch, done_in_epoch = divmod(resumed_step, steps_per_epoch)
    if resumed_step:
        print(f"Resuming from {backup_dir}: epoch {min(resumed_epoch, cfg.epochs - 1) + 1}/{cfg.epochs}, "
              f"optimizer step {resumed_step}", flush=True)

    if cfg.sample_products > 0:
        samples = split_dataset(cfg, "train", training=True, batch_size=cfg.sample_products,
                                shuffle_buffer=64, seed=cfg.seed)
        features, label = next(iter(samples))
        visuals.write_sample_grid(features, label, visuals.class_names(labels),
                                  os.path.join(model_dir, model_dir_lib.LOGS_DIR))
    callbacks = callbacks_lib.make_callbacks(
        model_dir, epochs=cfg.epochs, steps_per_epoch=steps_per_epoch, global_batch=cfg.batch_size,
        backup_every_steps=cfg.backup_every_steps, log_every_steps=cfg.log_every_steps,
        profile_steps=cfg.profile_batches, has_val=has_val,
    ) + list(extra_callbacks)
    # fit() runs whole epochs of one length: a run resumed inside an epoch first finishes that
    # epoch's remaining steps in a fit call of its own, so that no optimizer step is run twice.
    phases = []  # (first epoch, end epoch, steps per epoch)
    if done_in_epoch:
        phases.append((resumed_epoch, resumed_epoch + 1, steps_per_epoch - done_in_epoch))
        resumed_epoch += 1
    if resumed_epoch < cfg.epochs:
        phases.append((resumed_epoch, cfg.epochs, steps_per_epoch))
    history = {}
    for first_epoch, end_epoch, steps in phases:
        try:
            fitted = model.fit(
                train_ds,
                initial_epoch=first_epoch,
                epochs=end_epoch,
                steps_per_epoch=steps,
                validation_data=val_ds,
                callbacks=callbacks,
                verbose=cfg.verbose,
                shuffle=False,  # the pipeline shuffles; Keras cannot shuffle a tf.data stream anyway
            )
        except tf.errors.DataLossError:
            raise  # a damaged shard: train() names it
        except Exception as e:
            if distribution.is_multi_worker(strategy):
                raise RuntimeError(
                    "model.fit failed under MultiWorkerMirroredStrategy (TF_CONFIG is set). Keras 3 has "
                    "open issues there (keras-team/keras#20585, tensorflow/tensorflow#72388); the two met "
                    "with Keras 3.15 are worked around (model/distribution.py), this one is not. Unset "
                    f"TF_CONFIG to train on this machine's devices. Original error: {e}"
                ) from e
            raise
        for name, values in fitted.history.items():
            history.setdefault(name, []).extend(values)
        if model.stop_training and any(not math.isfinite(v[-1]) for v in history.values() if v):
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
        optimization.compile_model(final, cfg, keras.optimizers.SGD(), aux_heads)  # for evaluate(); never trained
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
    state = {
        "epochs": cfg.epochs,
        "steps_per_epoch": steps_per_epoch,
        "optimizer_iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "resumed_epoch": resumed_step // steps_per_epoch,
        "resumed_step": resumed_step,
        "bn_recalibration_batches": recalibrated,
        "final": {k: float(v[-1]) for k, v in history.items() if v},
        "final_val": {k: float(v) for k, v in final_val.items()},
        "skipped_records": skipped,
    }
    with tf.io.gfile.GFile(os.path.join(model_dir, model_dir_lib.STATE_FILE), "w") as f:
        json.dump(state, f, indent=1)
    if tf.io.gfile.exists(backup_dir):
        tf.io.gfile.rmtree(backup_dir)
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
