"""TFRecord shards (record_schema) -> batches of padded product image stacks for Keras.

    features["images"]      uint8   [batch, max_images, side, side, 3], zeros where mask is 0
    features["mask"]        float32 [batch, max_images], 1.0 for a real image
    features["product_id"]  int64   [batch]
    label                   int64   [batch], -1 when unlabelled

`side` is `image_size`, or `crop_size` when one is given (see `create_dataset`).

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

from typing import Mapping, Sequence

import tensorflow as tf

import record_schema
from model.data_service import splits
from model.input_pipeline.decode import decode_images, parse_batch, random_offsets

AUTOTUNE = tf.data.AUTOTUNE
# The mapped functions hold no Python control flow on tensors, so AutoGraph has nothing to
# convert; skipping it saves tracing time.
_plain = tf.autograph.experimental.do_not_convert

# Cap on the memory tf.data's autotuner may spend on buffers (prefetch, parallel map outputs). A
# batch of 64 products at 180 px is 25 MB; the default budget is half the host's RAM, which on a
# shared machine or with one pipeline per replica lets prefetch buffers grow far beyond any use.
_RAM_BUDGET = 2 << 30


# ---------------------------------------------------------------------------------------------
# The pipeline


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
    start_batch: int = 0,
    record_counts: Mapping[str, int] | None = None,
) -> tf.data.Dataset:
    """Batches of `(features, label)` from the TFRecord shards matching `file_pattern`.

    training=False: every record in file order then record order (files sorted by name), no
    shuffle, no augmentation, a short last batch kept. training=True: files and records shuffled,
    each image randomly cropped (crop_size), batches of exactly batch_size (drop_remainder: static
    shapes for distribution and XLA). No mirror here: the model mirrors in training
    (multi_image.ModelConfig.flip), so evaluation, serving and training decode the same way.

    Image side: decoded images are brought to image_size by `decode_image` (a DCT-scaled decode,
    then a resize only where one is left to do). With a crop_size (<= image_size) the output side
    is crop_size in both modes: a random crop_size window of the image_size picture in training,
    the centre window in evaluation, so the model sees one input shape throughout (the Kaggle top
    teams' recipe was random 160 px crops of the 180 px pictures). Without it, the side is
    image_size as docs/FORMATS.md section 3 states.

    skip_corrupt_records: a damaged record ends its file instead of the stream (model/input_pipeline/shards.py
    names and counts what that loses).

    seed (training): an int makes the stream a pure function of (seed, this pipeline's share):
    pass p over the share reads its files in an order drawn from (seed, p) and shuffles their
    records in blocks of shuffle_buffer, each by a permutation drawn from (seed, p, block);
    passes follow one another (with repeat), batches
    run across their boundaries, and batch b's crops are drawn from (seed, pipeline, b). So the
    stream can start at any batch (start_batch) and give exactly what an uninterrupted stream
    gives from there: the records before it are skipped before any parse or decode, from the
    start of the pass it falls in (record_counts, the readable records of each file, say where
    the passes end; train.py has them from its shard check). None draws fresh numbers every run,
    with nondeterministic (faster) element order; start_batch must then be 0.

    input_context (from `strategy.distribute_datasets_from_function`): this pipeline reads its
    share only. With at least as many files as pipelines the share is whole files (cheap: each
    file is read by one pipeline; shards are balanced by the converter); with fewer files every
    pipeline reads every file and keeps every n-th record of each (exact, costs redundant reads).
    batch_size is then the per-replica batch (`input_context.get_per_replica_batch_size`).

    dynamic_sharding (training only): the pipeline is for tf.data service workers under dynamic
    sharding (docs/DATA_SERVICE.md). Its first source is `splits.file_splits`: one split
    per file, every file once a pass in a new seeded order, endless with repeat; the dispatcher
    hands the splits to the workers. No file shuffle or repeat on the workers (the first would let
    one worker take every file of a pass into its buffer, the second gives each worker passes of
    its own) and no share per input pipeline (every replica and trainer reads the one job).
    `seed` then orders the files only; each worker's record shuffle and crops draw their own
    numbers (one seed would give every worker the same crops), so the order is not reproducible.
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if dynamic_sharding and not training:
        raise ValueError("dynamic_sharding is for the training stream (training=True)")
    if crop_size is not None and not 0 < crop_size <= image_size:
        raise ValueError(f"crop_size must be in 1..image_size ({image_size}), got {crop_size}")
    files = sorted(tf.io.gfile.glob(file_pattern))
    if not files:
        raise FileNotFoundError(f"no TFRecord file matches {file_pattern!r}")
    # An empty file holds no record. Left in, a pipeline whose share is only empty files would
    # repeat nothing forever (a spinning, silent hang at step 1 under a multi-worker strategy).
    records = [path for path in files if tf.io.gfile.stat(path).length > 0]
    if repeat and not records:
        raise ValueError(f"every file matching {file_pattern!r} is empty: nothing to repeat")
    files = records or files

    pipelines, pipeline_id = 1, 0
    if input_context is not None and not dynamic_sharding:
        pipelines, pipeline_id = input_context.num_input_pipelines, input_context.input_pipeline_id
    record_shards = pipelines > 1 and len(files) < pipelines
    if pipelines > 1 and not record_shards:
        files = files[pipeline_id::pipelines]  # before any shuffle, so the shares are disjoint

    @_plain
    def read(path):
        records = tf.data.TFRecordDataset(path)
        if skip_corrupt_records:  # TensorFlow's reader cannot resynchronise: the rest of the file goes
            records = records.ignore_errors()
        return records.shard(pipelines, pipeline_id) if record_shards else records

    if start_batch and (not training or (seed is None and not dynamic_sharding)):
        raise ValueError("start_batch needs a seeded training stream (training=True and a seed)")
    crop_seeds = None
    if dynamic_sharding:
        # start_batch counts batches of the whole job (all replicas): the passes before the one
        # it falls in are not handed out; that pass is read again from its start.
        first_pass = 0
        if start_batch:
            first_pass = start_batch * batch_size // max(1, sum(_share_records(record_counts, path, 1, 0)
                                                                for path in files))
        ds = splits.file_splits(files, seed=seed, repeat=repeat, first_pass=first_pass)
        seed = None  # from here on, each worker its own random numbers
        ds = ds.interleave(read, cycle_length=min(len(files), 16), num_parallel_calls=AUTOTUNE)
        ds = ds.shuffle(shuffle_buffer, reshuffle_each_iteration=True)
    elif training and seed is not None:
        share = ([_share_records(record_counts, path, pipelines if record_shards else 1, pipeline_id)
                  for path in files] if start_batch else None)
        ds, skip = _seeded_passes(files, read, seed=seed, shuffle_buffer=shuffle_buffer, repeat=repeat,
                                  skip_records=start_batch * batch_size, share_records=share)
        ds = ds.skip(skip)
        # Batch b's crops from (seed, pipeline, b): the same numbers wherever the stream starts.
        pipeline_seed = tf.constant([seed, pipeline_id], tf.int64)
        crop_seeds = tf.data.Dataset.counter(start_batch).map(
            lambda b: tf.random.experimental.stateless_fold_in(pipeline_seed, b))
    elif training:
        ds = tf.data.Dataset.from_tensor_slices(files).shuffle(len(files), reshuffle_each_iteration=True)
        if repeat:
            ds = ds.repeat()  # at file level: no drained buffers and no short batch at epoch ends
        # Several files at once: parallel reads (latency on GCS) and a better mix for the shuffle.
        ds = ds.interleave(read, cycle_length=min(len(files), 16), num_parallel_calls=AUTOTUNE)
        ds = ds.shuffle(shuffle_buffer, reshuffle_each_iteration=True)
    else:
        ds = tf.data.Dataset.from_tensor_slices(files).flat_map(read)  # file order, then record order

    # A batch of records is one element from here on: one parse_example call and one decode
    # function per batch (per-product elements cost ~100 us each of tf.data and executor machinery,
    # half a JPEG decode). Parallelism comes from several batches in flight (the map's
    # num_parallel_calls) and several images decoding at once within each (parallel_decodes).
    # In training the batch's crop offsets come from a seed per batch (stateful random ops in a
    # parallel map would depend on the order the map's calls run in).
    ds = ds.batch(batch_size, drop_remainder=training)
    if training and crop_size:
        if crop_seeds is None:  # unseeded: new numbers every run and every pass
            crop_seeds = tf.data.Dataset.random(rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip(ds, crop_seeds)

    @_plain
    def parse_and_decode(serialized, batch_seed=None):
        parsed = parse_batch(serialized, max_images)
        offset = None
        if batch_seed is not None:
            offset = random_offsets(batch_seed, tf.shape(parsed[record_schema.IMAGES]),
                                    image_size=image_size, crop_size=crop_size)
        images = decode_images(parsed[record_schema.IMAGES], parsed[record_schema.MASK], image_size,
                               crop_size=crop_size, offset=offset)
        features = {record_schema.IMAGES: images, record_schema.MASK: parsed[record_schema.MASK],
                    record_schema.PRODUCT_ID: parsed[record_schema.PRODUCT_ID]}
        return features, parsed[record_schema.LABEL]

    ds = ds.map(parse_and_decode, num_parallel_calls=AUTOTUNE)

    options = tf.data.Options()
    # Order only matters for evaluation (ids line up with predictions) and for seeded runs. In
    # training a slow file or image must not stall the others, so every parallel stage (the
    # interleave, both maps) may hand out elements as they finish.
    options.deterministic = not training or seed is not None
    options.autotune.ram_budget = _RAM_BUDGET
    # Parallelism comes from the parallel maps across products; letting single ops (resize,
    # concat) fan out inside an element only adds scheduling on a few cores.
    options.threading.max_intra_op_parallelism = 1
    # No private thread pool: on a CPU host the model step and the pipeline share the same cores
    # whatever the pools, and on an accelerator host the shared pool is the pipeline's anyway.
    if input_context is not None:
        # Sharded above; stop tf.distribute from sharding again should it be handed this dataset.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(AUTOTUNE)


# ---------------------------------------------------------------------------------------------
# The seeded training stream: passes over the share, each a pure function of (seed, pass)


def _seeded_passes(files: list[str], read, *, seed: int, shuffle_buffer: int, repeat: bool, skip_records: int,
                   share_records: Sequence[int] | None) -> tuple[tf.data.Dataset, int]:
    """(the records of passes first_pass, first_pass + 1, ... over `files`, records to skip in it).

    skip_records records of the whole stream are to be skipped: whole passes are not read at all
    (each holds sum(share_records) records), the rest is the returned count."""
    first_pass, skip = 0, skip_records
    if skip_records:
        per_pass = sum(share_records)
        if per_pass < 1:
            raise ValueError("the files hold no record: nothing to start a stream in")
        first_pass, skip = divmod(skip_records, per_pass)
        if first_pass and not repeat:
            raise ValueError(f"start past the one pass: {skip_records} records of {per_pass}")
    names = tf.constant(files, tf.string)
    count = len(files)

    @_plain
    def one_pass(pass_index):
        pass_seed = tf.stack([tf.constant(seed, tf.int64), pass_index])
        order = tf.random.experimental.index_shuffle(tf.range(count, dtype=tf.int64), pass_seed, max_index=count - 1)
        records = tf.data.Dataset.from_tensor_slices(tf.gather(names, order)).interleave(
            read, cycle_length=min(count, 16), num_parallel_calls=AUTOTUNE, deterministic=True)
        # Shuffled in blocks of shuffle_buffer records, each by a permutation drawn from (seed,
        # pass, block): stateless, so the pass is a pure function of its seed. Dataset.shuffle
        # cannot take a seed computed here: TensorFlow's seed helper compares the seed pair with
        # (0, 0) in Python, which fails on a tensor whenever the process's global seed is 0.
        return records.batch(shuffle_buffer).enumerate().map(
            lambda block, window: tf.random.experimental.stateless_shuffle(
                window, tf.random.experimental.stateless_fold_in(pass_seed, block))).unbatch()

    passes = tf.data.Dataset.counter(first_pass) if repeat else tf.data.Dataset.range(first_pass, first_pass + 1)
    return passes.flat_map(one_pass), skip


def _share_records(record_counts: Mapping[str, int] | None, path: str, pipelines: int, pipeline_id: int) -> int:
    """Records this pipeline reads from `path`: all of them, or every pipelines-th one from
    pipeline_id when the pipelines share files record by record."""
    if record_counts is None or path not in record_counts:
        raise ValueError(f"start_batch needs record_counts for every file: {path} has none")
    count = record_counts[path]
    return count if pipelines == 1 else max(0, (count - pipeline_id + pipelines - 1) // pipelines)
