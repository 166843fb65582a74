"""A model_dir's earlier run: whether it may be resumed or reused with this config, and how an
epoch is cut into Keras executions."""

from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import random

import tensorflow as tf

from model.config import TrainConfig, config_from_json
from model.errors import UserError
from model.model_dir import RunFolder
from model.training.callbacks import BACKUP_WEIGHTS


# Settings that do not change what a run computes: a resumed or finished run may differ in them.
RUN_INDEPENDENT = frozenset({"model_dir", "verbose", "profile_batches", "sample_products", "backup_every_steps", "input_check",
                             "export_top_k", "cpu_devices", "shuffle_buffer", "steps_per_execution",
                             "log_every_steps", "expect_gpus",
                             "skip_corrupt_records", "verify_records", "data_service", "export_flip_tta"})
# Of those, the ones that change the training stream's batches (which products, in which order):
# a run resumed with another value trains on, but not on the stream an uninterrupted run reads.
STREAM_SETTINGS = ("shuffle_buffer", "data_service", "replicas")


PATH_SETTINGS = frozenset({"data_dir", "weights", "init_from"})
# Recorded in train_config.json resolved (resolved_path), so that the record names the same folders
# from any working directory; compared resolved, so DIR and /abs/DIR are one setting.
RESOLVED_SETTINGS = ("data_dir", "model_dir", "init_from")


def normalised_path(path: str) -> str:
    """DIR/, DIR/./ and DIR name one folder; gs://B/DIR/ and gs://B/DIR one prefix."""
    if not path or "://" in path:
        return path.rstrip("/") if path else path
    return os.path.normpath(path)


def resolved_path(path: str) -> str:
    """A local path made absolute (against the working directory), normalised; a URI (gs://,
    file://, ...) and "" as given. A relative path recorded by an older version resolves, as
    it did then, against the directory the run is resumed from."""
    if not path or "://" in path:
        return path
    return os.path.abspath(path)


def recorded_train_config(cfg: TrainConfig) -> dict:
    """train_config.json["train"]: every field of cfg, its paths resolved."""
    return {**dataclasses.asdict(cfg), **{name: resolved_path(getattr(cfg, name)) for name in RESOLVED_SETTINGS}}


def resolve_seed(model_dir: str, cfg: TrainConfig, *, multi_worker: bool = False) -> tuple[TrainConfig, str]:
    """cfg with a seed, and where it comes from. --seed=0 means "any": the seed of the run this
    model_dir already holds (train_config.json), else one drawn now; train_config.json records it,
    so a resumed run reads the very stream it would have read uninterrupted. Under a multi-worker
    strategy every worker must take the same one without talking: it is derived from model_dir."""
    if cfg.seed:
        return cfg, "given"
    config_path = RunFolder(model_dir).config_file
    if tf.io.gfile.exists(config_path):
        with tf.io.gfile.GFile(config_path) as f:
            recorded = json.load(f)["train"].get("seed", 0)
        if recorded:
            return dataclasses.replace(cfg, seed=int(recorded)), f"recorded in {config_path}"
    # 31 bits: a seed every TensorFlow seed argument takes as it is.
    if multi_worker:
        digest = hashlib.sha256(normalised_path(model_dir).encode()).digest()
        return dataclasses.replace(cfg, seed=int.from_bytes(digest[:4], "big") % ((1 << 31) - 1) + 1), \
            "derived from --model_dir: every worker the same"
    return dataclasses.replace(cfg, seed=random.SystemRandom().randrange(1, 1 << 31)), "drawn"


def settings_differences(saved: dict, cfg: TrainConfig) -> list[str]:
    """The settings of a saved train_config.json["train"] that differ from cfg, as flags (paths
    compared once resolved and normalised)."""
    def same(name, a, b):
        if name in PATH_SETTINGS and name in RESOLVED_SETTINGS:
            return normalised_path(resolved_path(a)) == normalised_path(resolved_path(b))
        return normalised_path(a) == normalised_path(b) if name in PATH_SETTINGS else a == b

    known = dataclasses.asdict(config_from_json(saved))  # as this version spells them (crop_size 0: None)
    return [f"--{name}={saved[name]} (now {value})" for name, value in dataclasses.asdict(cfg).items()
            if name not in RUN_INDEPENDENT and name in saved and not same(name, known[name], value)]


def stream_changes(model_dir: str, cfg: TrainConfig, replicas: int) -> list[str]:
    """The stream settings of the run saved in model_dir that cfg (on `replicas` replicas) changes."""
    config_path = RunFolder(model_dir).config_file
    if not tf.io.gfile.exists(config_path):
        return []
    with tf.io.gfile.GFile(config_path) as f:
        saved = json.load(f)
    before = {**saved["train"], "replicas": saved.get("replicas", replicas)}
    now = {**dataclasses.asdict(cfg), "replicas": replicas}
    return [f"{name} {before[name]!r} -> {now[name]!r}" for name in STREAM_SETTINGS
            if name in before and before[name] != now[name]]


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
    run = RunFolder(model_dir)
    config_path, state_path = run.config_file, run.state_file
    exists = tf.io.gfile.exists
    finished = exists(state_path) and exists(run.model_file)
    interrupted = exists(os.path.join(run.backup, BACKUP_WEIGHTS))
    if not (finished or interrupted) or not exists(config_path):
        return None
    with tf.io.gfile.GFile(config_path) as f:
        differences = settings_differences(json.load(f)["train"], cfg)
    if differences:
        kind = "a finished" if finished else "an interrupted"
        raise UserError(f"{model_dir} holds {kind} run with other settings: {'; '.join(differences)}. "
                            "Use another --model_dir, or the same settings to "
                            + ("reuse it" if finished else "resume it"))
    if not finished:
        return None
    with tf.io.gfile.GFile(state_path) as f:
        return json.load(f)
