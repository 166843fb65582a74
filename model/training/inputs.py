"""What the train loop feeds Keras: per-replica training streams (from a source of batches, the
data folder's by default), the validation stream, and the targets of every head (the category
and, where the tree has them, its upper levels)."""

from __future__ import annotations

import dataclasses
from typing import Callable

import tensorflow as tf

from model.config import TrainConfig
from model.data_service import stream
from model.input_pipeline import data_folder
from model.input_pipeline.labels import Labels
from model.input_pipeline.sources import StreamStart


def auxiliary_heads(labels: Labels, weight: float) -> dict:
    """{"level1": classes, "level2": classes} of the category tree's levels worth a head: a level
    with one class has nothing to learn (its loss is 0) and gets none."""
    if weight <= 0:
        return {}
    sizes = {"level1": len(labels.level1_names), "level2": len(labels.level2_names)}
    return {name: size for name, size in sizes.items() if size > 1}


def make_targets(labels: Labels, aux_heads: dict):
    """Class index -> one-hot targets per head (CategoricalCrossentropy is the one with smoothing)."""
    level_index = {"level1": tf.constant(labels.level1_index), "level2": tf.constant(labels.level2_index)}

    def targets(features, label):
        inputs = {"images": features["images"], "mask": features["mask"]}
        y = {"category": tf.one_hot(label, labels.num_classes)}
        for name, classes in aux_heads.items():
            y[name] = tf.one_hot(tf.gather(level_index[name], label), classes)
        return inputs, y

    return targets


@dataclasses.dataclass(frozen=True)
class Pipeline:
    """One input pipeline of a run's training stream: its share (input_context), its per-replica
    batch and where it starts."""

    input_context: tf.distribute.InputContext
    batch_size: int
    start: StreamStart


# A run's source of training batches: (cfg, pipeline) -> the pipeline's (features, label) batches.
TrainingBatches = Callable[[TrainConfig, Pipeline], tf.data.Dataset]


def folder_batches(cfg: TrainConfig, pipeline: Pipeline) -> tf.data.Dataset:
    """The default source of training batches: the train split of cfg.data_dir, seeded by
    cfg.seed, endless (fit counts steps_per_epoch; the stream never ends mid-epoch), in the
    dynamic-sharding structure with cfg.data_service."""
    return data_folder.split_dataset(
        cfg.data_dir, "train", cfg.image, training=True, batch_size=pipeline.batch_size,
        skip_corrupt_records=cfg.skip_corrupt_records, shuffle_buffer=cfg.shuffle_buffer, seed=cfg.seed,
        input_context=pipeline.input_context, repeat=True, start=pipeline.start,
        dynamic_sharding=bool(cfg.data_service))


def train_dataset(cfg: TrainConfig, strategy, targets, service_job: str = "", *, start_step: int = 0,
                  records_per_file: dict | None = None, batches: TrainingBatches = folder_batches):
    """Per-replica pipelines: each replica reads its own batch (global batch / replicas), from
    optimizer step `start_step` on.

    Each replica's stream is a pure function of cfg.seed and its share of the files
    (create_dataset): started at start_step, it gives exactly the batches an uninterrupted run
    gives there, the earlier ones skipped before decode (records_per_file: readable records per
    file, from shards.check_split). With cfg.data_service the pipeline runs on the service's
    workers under dynamic sharding, every replica of every trainer reads one shared job
    (`service_job`, see data_service), and a start inside a pass restarts that pass."""

    def dataset_fn(input_context: tf.distribute.InputContext):
        batch_size = input_context.get_per_replica_batch_size(cfg.batch_size)
        # A pipeline gives one batch a step to each replica it feeds (all of this host's under
        # MirroredStrategy); a service's job is shared: start_step global batches were taken from it.
        replicas_fed = input_context.num_replicas_in_sync // input_context.num_input_pipelines
        start_batch = start_step * (input_context.num_replicas_in_sync if cfg.data_service else replicas_fed)
        ds = batches(cfg, Pipeline(input_context, batch_size, StreamStart(start_batch, records_per_file)))
        if cfg.data_service:
            ds = stream.distribute(ds, cfg.data_service, job_name=f"{service_job}-b{batch_size}-s{start_step}")
        return ds.map(targets, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)

    return strategy.distribute_datasets_from_function(dataset_fn)


def eval_dataset(cfg: TrainConfig, split: str, targets):
    # A plain dataset of global batches: Keras distributes it, and handles the short last batch.
    ds = data_folder.split_dataset(cfg.data_dir, split, cfg.image, training=False, batch_size=cfg.batch_size,
                                   skip_corrupt_records=cfg.skip_corrupt_records)
    # Multi-worker: every worker evaluates the same batches. Redundant, but exact, and valid for
    # a val split of one file (AUTO sharding would demand a file per worker).
    options = tf.data.Options()
    options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    ds = ds.with_options(options)
    return ds.map(targets, num_parallel_calls=tf.data.AUTOTUNE).prefetch(tf.data.AUTOTUNE)
