"""TFRecord shards (record_schema) -> batches of padded product image stacks for Keras.

    features["images"]      uint8   [batch, max_images, side, side, 3], zeros where mask is 0
    features["mask"]        float32 [batch, max_images], 1.0 for a real image
    features["product_id"]  int64   [batch]
    label                   int64   [batch], -1 when unlabelled

`side` is `image.side`: the crop when one is given, else the decode size (see `create_dataset`).
The records come from one of the named sources of `sources.py`; the tail here is the same for
all: batch, parse and decode (with the crops), options, prefetch.

Where the time goes, and so the shape of the pipeline (figures: bench/RESULTS_pipeline.md): a
180x180 JPEG costs ~150 us to decode here, a tf.data element or a `tf.cond` with a big untaken
branch tens of us, and a pass over a batch's output (4 slots x 97 KB a product, only 1.7 of them
real on average) ~60 us a product. So a batch of records stays one element from reading to the
end: one `parse_example` call, then one function decodes the batch's real images, several at
once, into a pool and writes the padded stack with one gather, with one branch per batch (not
per image) for pictures of an unexpected size. The earlier shape (products as elements, a branch
per slot, a concat per product, then the batch copy) ran at 0.66-0.68 of the decode ceiling;
this one, in training, at 0.9-1.0 of it at 180 px and 1.1-1.3 at 48 and 90 px (2026-11-30).
"""

from __future__ import annotations

import tensorflow as tf

import record_schema
from model.config import ImageSpec
from model.input_pipeline import sources
from model.input_pipeline.decode import decode_images, parse_batch, random_offsets
from model.input_pipeline.sources import StreamStart

AUTOTUNE = tf.data.AUTOTUNE
# The mapped functions hold no Python control flow on tensors, so AutoGraph has nothing to
# convert; skipping it saves tracing time.
_plain = tf.autograph.experimental.do_not_convert

# Cap on the memory tf.data's autotuner may spend on buffers (prefetch, parallel map outputs). A
# batch of 64 products at 180 px is 25 MB; the default budget is half the host's RAM, which on a
# shared machine or with one pipeline per replica lets prefetch buffers grow far beyond any use.
_RAM_BUDGET = 2 << 30


def create_dataset(
    file_pattern: str,
    *,
    batch_size: int,
    training: bool,
    image_size: int = record_schema.IMAGE_SIZE,
    crop_size: int | None = None,
    shuffle_buffer: int = 2048,
    seed: int | None = None,
    input_context: tf.distribute.InputContext | None = None,
    max_images: int = record_schema.MAX_IMAGES,
    repeat: bool = False,
    dynamic_sharding: bool = False,
    skip_corrupt_records: bool = False,
    start: StreamStart = StreamStart(),
) -> tf.data.Dataset:
    """Batches of `(features, label)` from the TFRecord shards matching `file_pattern`
    (docs/FORMATS.md section 3 is the contract), from one of four sources (sources.py):

    training=False: `evaluation_records`, every record in file order, a short last batch kept, the
    centre crop. training=True, batches of exactly batch_size (drop_remainder: static shapes for
    distribution and XLA), random crops: `seeded_passes` with an int seed (a pure function of
    (seed, this pipeline's share), which can begin at any batch: `start`), `shuffled_records`
    without one (new numbers every run, nondeterministic faster order), `service_splits` with
    dynamic_sharding (the pipeline of tf.data service workers: docs/DATA_SERVICE.md; `seed` orders
    the files only, `start` counts the whole job's batches and restarts the pass it falls in).

    image_size, crop_size (the contract's spelling of an ImageSpec, as split_dataset passes one):
    decoded at image_size by `decode_image`, then the crop_size window (<= image_size), so the
    side is the crop in both modes (the Kaggle top teams' recipe was random 160 px crops of the
    180 px pictures). No mirror here: the model mirrors in training (multi_image.ModelConfig.flip).
    input_context: this pipeline reads its share only (sources.Share); batch_size is then the
    per-replica batch. skip_corrupt_records: a damaged record ends its file instead of the stream
    (model/input_pipeline/shards.py names and counts what that loses).
    """
    _check_arguments(batch_size, training, seed, dynamic_sharding, start)
    image = ImageSpec(image_size, crop_size)
    files = sources.list_files(file_pattern, repeat=repeat)
    share = sources.Share.of(files, None if dynamic_sharding else input_context)
    read = share.reader(skip_corrupt_records)
    crop_seeds = None
    if dynamic_sharding:
        first_pass = sources.service_first_pass(start, batch_size, share.files)
        records = sources.service_splits(share.files, read, seed=seed, shuffle_buffer=shuffle_buffer, repeat=repeat,
                                         first_pass=first_pass)
    elif training and seed is not None:
        records = sources.seeded_passes(share.files, read, seed=seed, shuffle_buffer=shuffle_buffer, repeat=repeat,
                                        skip_records=start.batch * batch_size,
                                        share_records=share.records(start) if start.batch else None)
        crop_seeds = _seeded_crop_seeds(seed, share.pipeline_id, start.batch)
    elif training:
        records = sources.shuffled_records(share.files, read, shuffle_buffer=shuffle_buffer, repeat=repeat)
    else:
        records = sources.evaluation_records(share.files, read)
    # Order only matters for evaluation (ids line up with predictions) and for seeded runs; a
    # service stream's workers draw their own numbers whatever the seed.
    deterministic = not training or (seed is not None and not dynamic_sharding)
    batches = _decoded_batches(records, batch_size=batch_size, training=training, image=image,
                               max_images=max_images, crop_seeds=crop_seeds)
    return _finish(batches, deterministic=deterministic, sharded=input_context is not None)


def _check_arguments(batch_size: int, training: bool, seed: int | None, dynamic_sharding: bool,
                     start: StreamStart) -> None:
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if dynamic_sharding and not training:
        raise ValueError("dynamic_sharding is for the training stream (training=True)")
    if start.batch and (not training or (seed is None and not dynamic_sharding)):
        raise ValueError("a start batch needs a seeded training stream (training=True and a seed)")


def _seeded_crop_seeds(seed: int, pipeline_id: int, start_batch: int) -> tf.data.Dataset:
    """Batch b's crop seed from (seed, pipeline, b): the same numbers wherever the stream starts."""
    pipeline_seed = tf.constant([seed, pipeline_id], tf.int64)
    return tf.data.Dataset.counter(start_batch).map(
        lambda b: tf.random.experimental.stateless_fold_in(pipeline_seed, b))


# ---------------------------------------------------------------------------------------------
# The shared tail: batch, parse and decode, options, prefetch


def _decoded_batches(records: tf.data.Dataset, *, batch_size: int, training: bool, image: ImageSpec,
                     max_images: int, crop_seeds: tf.data.Dataset | None) -> tf.data.Dataset:
    """Serialized records -> batches of (features, label).

    A batch of records is one element from here on: one parse_example call and one decode
    function per batch (per-product elements cost ~100 us each of tf.data and executor machinery,
    half a JPEG decode). Parallelism comes from several batches in flight (the map's
    num_parallel_calls) and several images decoding at once within each (parallel_decodes).
    In training the batch's crop offsets come from a seed per batch (stateful random ops in a
    parallel map would depend on the order the map's calls run in)."""
    ds = records.batch(batch_size, drop_remainder=training)
    if training and image.crop:
        if crop_seeds is None:  # unseeded: new numbers every run and every pass
            crop_seeds = tf.data.Dataset.random(rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip(ds, crop_seeds)

    @_plain
    def parse_and_decode(serialized, batch_seed=None):
        parsed = parse_batch(serialized, max_images)
        offset = None
        if batch_seed is not None:
            offset = random_offsets(batch_seed, tf.shape(parsed[record_schema.IMAGES]),
                                    image_size=image.size, crop_size=image.crop)
        images = decode_images(parsed[record_schema.IMAGES], parsed[record_schema.MASK], image.size,
                               crop_size=image.crop, offset=offset)
        features = {record_schema.IMAGES: images, record_schema.MASK: parsed[record_schema.MASK],
                    record_schema.PRODUCT_ID: parsed[record_schema.PRODUCT_ID]}
        return features, parsed[record_schema.LABEL]

    return ds.map(parse_and_decode, num_parallel_calls=AUTOTUNE)


def _finish(ds: tf.data.Dataset, *, deterministic: bool, sharded: bool) -> tf.data.Dataset:
    """The stream's options, then prefetch."""
    options = tf.data.Options()
    # In training without a seed a slow file or image must not stall the others, so every
    # parallel stage (the interleave, both maps) may hand out elements as they finish.
    options.deterministic = deterministic
    options.autotune.ram_budget = _RAM_BUDGET
    # Parallelism comes from the parallel maps across products; letting single ops (resize,
    # concat) fan out inside an element only adds scheduling on a few cores.
    options.threading.max_intra_op_parallelism = 1
    # No private thread pool: on a CPU host the model step and the pipeline share the same cores
    # whatever the pools, and on an accelerator host the shared pool is the pipeline's anyway.
    if sharded:
        # Sharded by sources.Share; stop tf.distribute from sharding again should it be handed this dataset.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(AUTOTUNE)
