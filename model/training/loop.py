"""The training run behind train.py: `train(config)`, a few named steps read top to bottom.

earlier run? -> strategy -> data -> run files -> model, optimizer, resume -> sample grid ->
fit -> final model (BatchNorm recalibrated, measured on val) -> model.keras, export/, state.
Tests call `train` directly; train.py only turns flags into a `TrainConfig`. Where it runs is
distribution.py, what it feeds Keras inputs.py, what it reports callbacks.py, what it exports
model/export.py.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import signal
import warnings
from typing import Callable

import keras
import tensorflow as tf

import record_schema
from model import atomic, export, signals
from model.config import TrainConfig
from model.data_service import probe, stream
from model.errors import Interrupted, UserError
from model.input_pipeline import data_folder, shards
from model.input_pipeline.labels import Labels, read_labels
from model.model_dir import BACKUP_DIR, RunFolder
from model.network import keras_file, multi_image
from model.training import (batchnorm, distribution, init_from, input_check, inputs, optimization, run_lock, run_state,
                            sample_grid)
from model.training.callbacks import TOP1, last_epoch_logs, make_callbacks, restore_backup


@dataclasses.dataclass
class RunData:
    """What the data folder gives a run: its streams, their sizes and the classes."""

    labels: Labels
    aux_heads: dict
    train_products: int
    has_val: bool
    skipped: dict  # split -> records read past (--skip_corrupt_records)
    steps_per_epoch: int
    train_stream: Callable[[int], object]  # optimizer step -> the distributed stream from there
    val_ds: tf.data.Dataset | None


def train(cfg: TrainConfig, extra_callbacks: tuple = (), flags_text: str = "",
          training_batches: inputs.TrainingBatches = inputs.folder_batches) -> dict:
    """Trains (or resumes) into cfg.model_dir; returns the final state written to train_state.json.

    extra_callbacks: Keras callbacks to run besides the built-in ones (after them).
    flags_text: the command's flags, kept in model_dir/flags.txt beside train_config.json.
    training_batches: the source of each input pipeline's training batches (inputs.Pipeline), the
    train split of cfg.data_dir by default; a test passes its own (e.g. one that wraps the default).
    A damaged shard met while training stops it with a UserError naming the file (the backup
    keeps what was trained); with cfg.skip_corrupt_records it is read past instead, and counted.
    SIGINT or SIGTERM finishes the step in flight, backs it up and raises errors.Interrupted.
    """
    try:
        with atomic.write_errors_named(cfg.model_dir), signals.stop_requests() as stop_requests:
            return _train(cfg, extra_callbacks, flags_text, stop_requests, training_batches)
    except tf.errors.DataLossError as error:
        # TensorFlow's message names no file: find it by reading every record, which raises the
        # one-line error (damage that kept the file's size passes the check by sizes at the start).
        for split in ("train", "val"):
            if tf.io.gfile.glob(data_folder.split_pattern(cfg.data_dir, split)):
                shards.check_split(cfg.data_dir, split, skip_corrupt_records=False, verify_records=True)
        raise UserError(f"{cfg.data_dir}: damaged record ({error.message.strip()})") from None


def _train(cfg: TrainConfig, extra_callbacks: tuple, flags_text: str, stop_requests,
           training_batches: inputs.TrainingBatches) -> dict:
    if cfg.init_from:
        init_from.source_file(cfg.init_from)  # a wrong path stops before any data is read
    tf.io.gfile.makedirs(cfg.model_dir)
    given_model_dir = cfg.model_dir
    strategy, cfg = _place(cfg)
    cfg = _seed(cfg, given_model_dir, strategy)
    # One tf.data service job for every replica and trainer of this run (model_dir as given: the
    # other workers write elsewhere), another for another run or other data settings.
    service_job = stream.job_name_for(given_model_dir, cfg.data_dir, cfg.image_size, cfg.crop_size, cfg.seed,
                                      cfg.shuffle_buffer)
    with run_lock.hold(cfg.model_dir):
        finished = run_state.check_earlier_run(given_model_dir, cfg)
        if finished is not None:
            print(f"{given_model_dir} already holds a finished run of these settings ({cfg.epochs} epochs); "
                  "nothing to do.")
            return finished
        # Every worker resumes from the chief's backup (model_dir as given): the workers' own are
        # written at their own moments, and a kill can leave them a step apart.
        backup_dir = RunFolder(given_model_dir).backup
        data, cfg = _read_data(cfg, strategy, service_job, training_batches)
        return _train_held(cfg, strategy, data, extra_callbacks, flags_text, stop_requests, backup_dir)


def _train_held(cfg: TrainConfig, strategy, data: RunData, extra_callbacks: tuple, flags_text: str,
                stop_requests, backup_dir: str) -> dict:
    stop_requests.raise_if_requested()
    _describe(cfg, strategy, data)
    mconfig = model_config(cfg, data.labels, data.aux_heads, max_images=data_folder.max_images(cfg.data_dir))
    changes = run_state.stream_changes(cfg.model_dir, cfg, strategy.num_replicas_in_sync)
    _write_run_files(cfg, mconfig, flags_text, strategy.num_replicas_in_sync)
    model, resumed_step = _build_and_restore(cfg, strategy, mconfig, data, backup_dir)
    _stop_if_requested(stop_requests, model, cfg)
    if resumed_step and changes:
        print(f"Resumed with other stream settings ({'; '.join(changes)}): from here the batches are not "
              "the ones an uninterrupted run reads (README: Interrupted?)", flush=True)
    if cfg.sample_products > 0:
        _write_samples(cfg, data.labels)
    rates = None
    if cfg.input_check:
        # With a tf.data service the stream is a shared job: the one batch the model is timed on is
        # taken from it, but the input's own rate is not read (every batch read would be lost to training).
        rates = input_check.measure(model, strategy, data.train_stream(resumed_step), cfg.batch_size,
                                    measure_input=not cfg.data_service)
        print(rates.verdict(distribution.describe(strategy)), flush=True)
        _stop_if_requested(stop_requests, model, cfg)
    callbacks = make_callbacks(
        cfg.model_dir, epochs=cfg.epochs, steps_per_epoch=data.steps_per_epoch, global_batch=cfg.batch_size,
        backup_every_steps=cfg.backup_every_steps, log_every_steps=cfg.log_every_steps,
        profile_steps=cfg.profile_batches, has_val=data.has_val, stop_requests=stop_requests,
        compute_seconds_per_product=rates.step_seconds if rates else None,
    ) + list(extra_callbacks)
    history = _fit(model, cfg, strategy, data, callbacks, resumed_step)
    if not history:  # resumed after its last epoch (a kill in the final steps): that epoch's figures
        history = {name: [value] for name, value in last_epoch_logs(backup_dir, resumed_step).items()}
    _stop_if_requested(stop_requests, model, cfg)
    final, recalibrated, final_val = _final_model(model, cfg, mconfig, data)
    _stop_if_requested(stop_requests, model, cfg)
    best = _best_model(final, final_val, cfg, mconfig, data)
    _stop_if_requested(stop_requests, model, cfg)  # the last: _save ends with the backup removed
    return _save(final, best, model, cfg, data, resumed_step, recalibrated, history, final_val)


def _stop_if_requested(stop_requests, model: keras.Model, cfg: TrainConfig) -> None:
    """A safe point of the train loop (model.signals): a requested stop raises Interrupted saying
    what is kept. Until _save has written model.keras and export/, the backup holds the last step."""
    if stop_requests.signum is None:
        return
    name = signal.Signals(stop_requests.signum).name
    step = int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    if step == 0:
        raise Interrupted(stop_requests.signum, f"stopped by {name} before the first optimizer step; nothing "
                          "was trained yet")
    raise Interrupted(stop_requests.signum, f"stopped by {name} at optimizer step {step}; the backup in "
                      f"{cfg.model_dir}/{BACKUP_DIR} holds it. Run the same command to resume.")


def _place(cfg: TrainConfig) -> tuple[tf.distribute.Strategy, TrainConfig]:
    """The strategy, and the config with this worker's model_dir (multi-worker: non-chiefs write
    elsewhere)."""
    strategy = distribution.make_strategy(cfg.cpu_devices)
    worker_dir = distribution.worker_model_dir(cfg.model_dir, strategy)
    if worker_dir != cfg.model_dir:
        cfg = dataclasses.replace(cfg, model_dir=worker_dir)
        tf.io.gfile.makedirs(worker_dir)
    distribution.check_batch_divisible(cfg.batch_size, strategy.num_replicas_in_sync)
    if cfg.expect_gpus and not tf.config.list_logical_devices("GPU"):
        print("WARNING: this is a GPU configuration (--expect_gpus) but TensorFlow sees no GPU: training on the "
              "CPU. Install a GPU build of TensorFlow (README: GPUs) or drop --expect_gpus.", flush=True)
    keras.config.set_dtype_policy(cfg.precision)
    return strategy, cfg


def _seed(cfg: TrainConfig, model_dir: str, strategy) -> TrainConfig:
    """cfg with its seed (run_state.resolve_seed), which then seeds everything: the model's
    initial weights and the training mirror (Python, NumPy and TensorFlow seeds), the stream."""
    cfg, origin = run_state.resolve_seed(model_dir, cfg, multi_worker=distribution.is_multi_worker(strategy))
    keras.utils.set_random_seed(cfg.seed)
    if cfg.deterministic:
        tf.config.experimental.enable_op_determinism()
    print(f"Seed {cfg.seed} ({origin}){'; deterministic ops' if cfg.deterministic else ''}", flush=True)
    return cfg


def _read_data(cfg: TrainConfig, strategy, service_job: str,
               training_batches: inputs.TrainingBatches) -> tuple[RunData, TrainConfig]:
    """Sizes from metadata.json, classes and tree from labels.csv, then the training stream (its
    batches from training_batches) and the validation stream; the config comes back with
    steps_per_execution fitted to the epoch."""
    metadata = data_folder.read_metadata(cfg.data_dir)
    labels = read_labels(cfg.data_dir)
    aux_heads = inputs.auxiliary_heads(labels, cfg.aux_loss_weight)
    train_products = data_folder.split_products(metadata, "train")
    if train_products < 1 or not data_folder.has_split(cfg.data_dir, metadata, "train"):
        raise UserError(f"{cfg.data_dir} has no training products (metadata.json: {train_products}, "
                        f"shards: {data_folder.split_pattern(cfg.data_dir, 'train')})")
    has_val = data_folder.split_products(metadata, "val") > 0  # its shards, if gone, stop the check below
    # Every split read is checked first, as evaluate.py does: a missing, damaged or short shard
    # stops here with one line (damage is read past with --skip_corrupt_records, and counted).
    skipped, records_per_file = {}, {}
    for split in ("train", "val") if has_val else ("train",):
        check = shards.check_split(cfg.data_dir, split, skip_corrupt_records=cfg.skip_corrupt_records,
                                   verify_records=cfg.verify_records)
        if cfg.skip_corrupt_records:
            skipped[split] = check.unreadable
        if split == "train":
            records_per_file = check.records_per_file
    train_products -= skipped.get("train", 0)
    steps_per_epoch, steps_per_execution = run_state.align_to_executions(
        cfg.steps_per_epoch or max(1, train_products // cfg.batch_size), cfg.steps_per_execution)
    cfg = dataclasses.replace(cfg, steps_per_execution=steps_per_execution)
    targets = inputs.make_targets(labels, aux_heads)
    if cfg.data_service:
        # Before the dataset is registered: with no dispatcher that would block without a word.
        workers = probe.wait_for_workers(cfg.data_service)
        print(f"Training input from the tf.data service at {cfg.data_service}: {len(workers)} worker(s)", flush=True)
        probe.watch_workers(cfg.data_service, workers=len(workers))

    def train_stream(start_step: int):
        return inputs.train_dataset(cfg, strategy, targets, service_job, start_step=start_step,
                                    records_per_file=records_per_file, batches=training_batches)

    # Validation is a finite dataset and fit is NOT told its length: with a step count, Keras
    # 3.15 evaluate() pulls a batch from its cached iterator before resetting it, and under a
    # distribution strategy that is the exhausted iterator of the previous pass (StopIteration
    # at the second validation); and steps_per_execution > 1 rounds a count up past the end.
    # A shorter validation is a take() of the batches instead.
    val_ds = inputs.eval_dataset(cfg, "val", targets) if has_val else None
    if val_ds is not None and cfg.validation_steps:
        val_ds = val_ds.take(cfg.validation_steps)
    # Keras says this after every complete pass over a dataset of unknown length; the training
    # stream is infinite, so it can only be about validation, where it means nothing.
    warnings.filterwarnings("ignore", message="Your input ran out of data")
    return RunData(labels, aux_heads, train_products, has_val, skipped, steps_per_epoch, train_stream, val_ds), cfg


def _describe(cfg: TrainConfig, strategy, data: RunData) -> None:
    defaults = TrainConfig(data_dir=cfg.data_dir, model_dir=cfg.model_dir)
    changed = [f"--{name}={value}" for name, value in dataclasses.asdict(cfg).items()
               if name not in ("data_dir", "model_dir") and value != getattr(defaults, name)]
    print(f"Settings other than the defaults: {' '.join(changed) or 'none'}", flush=True)
    heads = "".join(f" + {name} head ({classes})" for name, classes in data.aux_heads.items())
    print(
        f"{distribution.describe(strategy)}; {data.train_products} training products, "
        f"{data.labels.num_classes} classes{heads}; "
        f"global batch {cfg.batch_size}, {data.steps_per_epoch} steps x {cfg.epochs} epochs",
        flush=True,
    )
    if data.train_products < cfg.batch_size:
        print(f"The train split has {data.train_products} products, fewer than one global batch of "
              f"{cfg.batch_size}: batches repeat products.", flush=True)
    if cfg.aux_loss_weight > 0:
        for name in ("level1", "level2"):
            if name not in data.aux_heads:
                print(f"No {name} head: labels.csv has one {name} class.", flush=True)
    if not data.has_val:
        print(f"No val split in {cfg.data_dir}: training without validation.", flush=True)


def model_config(cfg: TrainConfig, labels: Labels, aux_heads: dict,
                 max_images: int = record_schema.MAX_IMAGES) -> multi_image.ModelConfig:
    """The network's config: every ModelConfig field that TrainConfig has by name, the image side
    the network sees (after any crop), the weights (None for random), and the data's classes."""
    train_fields = {field.name for field in dataclasses.fields(TrainConfig)}
    shared = {field.name: getattr(cfg, field.name) for field in dataclasses.fields(multi_image.ModelConfig)
              if field.name in train_fields}
    return multi_image.ModelConfig(**{
        **shared, "image_size": cfg.image.side, "weights": cfg.weights or None,
        "num_classes": labels.num_classes, "num_level1": aux_heads.get("level1", 0),
        "num_level2": aux_heads.get("level2", 0), "max_images": max_images,
    })


def _write_run_files(cfg: TrainConfig, mconfig: multi_image.ModelConfig, flags_text: str, replicas: int) -> None:
    """labels.csv (evaluate.py maps class indices back to category ids with the model's own
    copy), train_config.json (with the seed, drawn or given, and the replicas) and flags.txt."""
    with atomic.written_whole(RunFolder(cfg.model_dir).labels_file) as partial:
        tf.io.gfile.copy(os.path.join(cfg.data_dir, record_schema.LABELS_FILE), partial, overwrite=True)
    atomic.write_text(RunFolder(cfg.model_dir).config_file,
                      json.dumps({"model": dataclasses.asdict(mconfig), "train": run_state.recorded_train_config(cfg),
                                  "replicas": replicas}, indent=1))
    if flags_text:
        atomic.write_text(RunFolder(cfg.model_dir).flags_file, flags_text)


def _build_and_restore(cfg: TrainConfig, strategy, mconfig, data: RunData, backup_dir: str) -> tuple[keras.Model, int]:
    """The model, built and compiled under the strategy so variables are mirrored on every
    replica, with the backup's weights and optimizer step when there is one."""
    with strategy.scope():
        model = multi_image.build_model(mconfig)
        schedule = optimization.learning_rate_schedule(cfg, data.steps_per_epoch)
        optimizer = optimization.make_optimizer(cfg, schedule)
        optimization.compile_model(model, cfg, optimizer, data.aux_heads)
        resumed_step = restore_backup(model, backup_dir)
    if cfg.init_from and not resumed_step:  # a resumed run has its own weights, from the backup
        init_from.initialise(model, cfg.init_from, data.labels)
    trainable = sum(int(keras.ops.size(v)) for v in model.trainable_variables)
    print(f"Model: {model.count_params():,} parameters ({trainable:,} trainable); {cfg.backbone} backbone at "
          f"{cfg.image.side} px, {cfg.fusion} fusion", flush=True)
    if resumed_step:
        resumed_epoch = resumed_step // data.steps_per_epoch
        print(f"Resuming from {backup_dir}: epoch {min(resumed_epoch, cfg.epochs - 1) + 1}/{cfg.epochs}, "
              f"optimizer step {resumed_step}", flush=True)
    return model, resumed_step


def _write_samples(cfg: TrainConfig, labels: Labels) -> None:
    samples = data_folder.split_dataset(cfg.data_dir, "train", cfg.image, training=True,
                                        batch_size=cfg.sample_products, skip_corrupt_records=cfg.skip_corrupt_records,
                                        shuffle_buffer=64, seed=cfg.seed)
    features, label = next(iter(samples))
    sample_grid.write_sample_grid(features, label, sample_grid.class_names(labels),
                                  RunFolder(cfg.model_dir).logs)


def fit_phases(resumed_step: int, steps_per_epoch: int, epochs: int) -> list[tuple[int, int, int]]:
    """(first epoch, end epoch, steps per epoch) of each fit call left to run.

    fit() runs whole epochs of one length: a run resumed inside an epoch (the optimizer's step
    count is the run's position) first finishes that epoch's remaining steps in a fit call of
    its own, so that no optimizer step is run twice."""
    resumed_epoch, done_in_epoch = divmod(resumed_step, steps_per_epoch)
    phases = []
    if done_in_epoch:
        phases.append((resumed_epoch, resumed_epoch + 1, steps_per_epoch - done_in_epoch))
        resumed_epoch += 1
    if resumed_epoch < epochs:
        phases.append((resumed_epoch, epochs, steps_per_epoch))
    return phases


def _fit(model: keras.Model, cfg: TrainConfig, strategy, data: RunData, callbacks: list,
         resumed_step: int) -> dict:
    history = {}
    for first_epoch, end_epoch, steps in fit_phases(resumed_step, data.steps_per_epoch, cfg.epochs):
        # Each fit call iterates its dataset from the start: give it the stream from its first
        # step (a phase of fewer steps than an epoch finishes the epoch a resumed run stopped in).
        start_step = first_epoch * data.steps_per_epoch + (data.steps_per_epoch - steps)
        try:
            fitted = model.fit(
                data.train_stream(start_step),
                initial_epoch=first_epoch,
                epochs=end_epoch,
                steps_per_epoch=steps,
                validation_data=data.val_ds,
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
                    "with Keras 3.15 are worked around (model/training/distribution.py), this one is not. "
                    f"Unset TF_CONFIG to train on this machine's devices. Original error: {e}"
                ) from e
            raise
        for name, values in fitted.history.items():
            history.setdefault(name, []).extend(values)
        if model.stop_training and any(not math.isfinite(v[-1]) for v in history.values() if v):
            raise RuntimeError("training stopped on a NaN loss; backup/ is kept, lower --base_lr")
        if model.stop_training:
            break  # SIGINT or SIGTERM: the backup holds this step, train() says so
    return history


def _final_model(model: keras.Model, cfg: TrainConfig, mconfig, data: RunData) -> tuple[keras.Model, int, dict]:
    """A plain copy outside the strategy (what evaluation and serving load), its BatchNorm
    statistics recalibrated on training batches, measured once more on val."""
    return _recalibrated(model.get_weights(), "Final model", cfg, mconfig, data)


def _recalibrated(weights: list, name: str, cfg: TrainConfig, mconfig, data: RunData) -> tuple[keras.Model, int, dict]:
    plain = multi_image.build_model(mconfig)
    plain.set_weights(weights)
    calibration = data_folder.split_dataset(cfg.data_dir, "train", cfg.image, training=True,
                                            batch_size=cfg.batch_size, skip_corrupt_records=cfg.skip_corrupt_records,
                                            seed=cfg.seed, repeat=True)
    recalibrated = batchnorm.recalibrate_batchnorm(plain, calibration, cfg.bn_recalibration_steps)
    val = {}
    if data.has_val:
        optimization.compile_model(plain, cfg, keras.optimizers.SGD(), data.aux_heads)  # for evaluate(); never trained
        val = plain.evaluate(data.val_ds, return_dict=True, verbose=0)
        print(f"{name} (BatchNorm recalibrated on {recalibrated} batches): val top-1 {val[TOP1]:.4f}, "
              f"top-5 {val['category_top5']:.4f}", flush=True)
    return plain, recalibrated, val


def _best_model(final: keras.Model, final_val: dict, cfg: TrainConfig, mconfig, data: RunData):
    """(the model of the best epoch, BatchNorm-recalibrated like the final one, its epoch, its val
    figures), or None without val. The final model itself when the last epoch was the best."""
    best_path = RunFolder(cfg.model_dir).best_file
    score_path = RunFolder(cfg.model_dir).best_score_file
    if not (data.has_val and tf.io.gfile.exists(best_path) and tf.io.gfile.exists(score_path)):
        return None
    with tf.io.gfile.GFile(score_path) as f:
        epoch = int(json.load(f)["epoch"])
    if epoch == cfg.epochs:
        print("Best model: the last epoch's, the final model", flush=True)
        return final, epoch, final_val
    weights = keras_file.load(best_path).get_weights()
    best, _, best_val = _recalibrated(weights, f"Best model (epoch {epoch})", cfg, mconfig, data)
    return best, epoch, best_val


def _export(model: keras.Model, cfg: TrainConfig, data: RunData, checkpoint: str) -> None:
    with atomic.written_whole(RunFolder(cfg.model_dir).export(checkpoint),
                              last="saved_model.pb") as partial:
        export.export_serving_model(model, data.labels, partial, image_size=cfg.image_size,
                                    crop_size=cfg.crop_size, top_k=cfg.export_top_k, flip_tta=cfg.export_flip_tta)


def _save_model(model: keras.Model, cfg: TrainConfig, checkpoint: str) -> None:
    with atomic.written_whole(RunFolder(cfg.model_dir).model(checkpoint)) as partial:
        model.save(partial)


def _save(final: keras.Model, best, model: keras.Model, cfg: TrainConfig, data: RunData, resumed_step: int,
          recalibrated: int, history: dict, final_val: dict) -> dict:
    """The final artefacts (best.keras and export_best/ replaced by the recalibrated best), then
    the backup dropped: from here a re-run has nothing left to do. model.keras goes last of the
    models: with train_state.json it is what says the run finished."""
    if best is not None and best[0] is not final:
        _export(best[0], cfg, data, "best")
        _save_model(best[0], cfg, "best")
    _export(final, cfg, data, "final")
    if best is not None and best[0] is final:
        # The same model: its export copied, not traced and written a second time (~6 s a run).
        with atomic.written_whole(RunFolder(cfg.model_dir).export("best"),
                                  last="saved_model.pb") as partial:
            atomic.copy_folder(RunFolder(cfg.model_dir).export("final"), partial)
        _save_model(final, cfg, "best")
    _save_model(final, cfg, "final")
    model_path = RunFolder(cfg.model_dir).model_file
    export_path = RunFolder(cfg.model_dir).export()
    state = {
        "epochs": cfg.epochs,
        "steps_per_epoch": data.steps_per_epoch,
        "optimizer_iterations": int(keras.ops.convert_to_numpy(model.optimizer.iterations)),
        "resumed_epoch": resumed_step // data.steps_per_epoch,
        "resumed_step": resumed_step,
        "bn_recalibration_batches": recalibrated,
        "final": {k: float(v[-1]) for k, v in history.items() if v},
        "final_val": {k: float(v) for k, v in final_val.items()},
        "best_epoch": best[1] if best else None,
        "best_val": {k: float(v) for k, v in best[2].items()} if best else {},
        "skipped_records": data.skipped,
    }
    atomic.write_text(RunFolder(cfg.model_dir).state_file, json.dumps(state, indent=1))
    backup_dir = RunFolder(cfg.model_dir).backup
    if tf.io.gfile.exists(backup_dir):
        tf.io.gfile.rmtree(backup_dir)
    print(f"Saved {model_path} and the SavedModel {export_path}" + (" (and the best epoch's: best.keras, export_best/)" if best else ""))
    return state
