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
once, into a pool and writes the padded stack with one gather. The earlier shape (products as
elements, a branch per slot, a concat per product, then the batch copy) ran at 0.66-0.68 of the
decode ceiling, this one at 0.70-0.82 with the random mirror and 0.87-1.05 in evaluation mode.
"""

from __future__ import annotations

import tensorflow as tf

import record_schema

AUTOTUNE = tf.data.AUTOTUNE
# The mapped functions hold no Python control flow on tensors (branches and loops are explicit
# tf.cond / tf.while_loop), so AutoGraph has nothing to convert; skipping it saves tracing time.
_plain = tf.autograph.experimental.do_not_convert

# TensorFlow's default ("") is libjpeg's IFAST; INTEGER_ACCURATE is ISLOW, what Pillow and most
# JPEG tools use: bit-identical to Pillow on the sample pictures (IFAST is off by up to 5 levels),
# so models trained here and any PIL-based tooling see the same pixels, for at most ~5% more
# decode time with libjpeg-turbo's SIMD ISLOW (within this machine's noise; bench/RESULTS_pipeline.md).
_DCT_METHOD = "INTEGER_ACCURATE"
# The record holds the BSON bytes verbatim. A truncated picture should cost one grey-bottomed image,
# not a multi-day training run or a submission missing rows; garbage still fails loudly.
_TRY_RECOVER_TRUNCATED = True
_ACCEPTABLE_FRACTION = 0.5

# Cap on the memory tf.data's autotuner may spend on buffers (prefetch, parallel map outputs). A
# batch of 64 products at 180 px is 25 MB; the default budget is half the host's RAM, which on a
# shared machine or with one pipeline per replica lets prefetch buffers grow far beyond any use.
_RAM_BUDGET = 2 << 30

# Images of one batch decoding at once (the while loop's parallel iterations). Batches in flight
# (the map's num_parallel_calls, autotuned) multiply it; 8 was the best of 4-64 on 2 cores.
_PARALLEL_DECODES = 8


# ---------------------------------------------------------------------------------------------
# Pure pieces: each works eagerly and inside tf.data / tf.function.


def parse_batch(serialized: tf.Tensor, max_images: int = record_schema.MAX_IMAGES) -> dict:
    """string [B] serialized records -> {"product_id", "label": int64 [B], "images": string [B, M],
    "mask": float32 [B, M]}.

    One `parse_example` per batch amortises the per-call cost that dominates per-record parsing.
    """
    parsed = tf.io.parse_example(serialized, record_schema.feature_spec(max_images))
    return {
        record_schema.PRODUCT_ID: tf.reshape(parsed[record_schema.PRODUCT_ID], [-1]),
        record_schema.LABEL: tf.reshape(parsed[record_schema.LABEL], [-1]),
        record_schema.IMAGES: parsed[record_schema.IMAGES],
        record_schema.MASK: tf.cast(parsed[record_schema.MASK], tf.float32),
    }


def decode_image(jpeg: tf.Tensor, image_size: int) -> tf.Tensor:
    """One JPEG -> uint8 [image_size, image_size, 3]; resized only when its size differs.

    The single place that fixes decoder settings, shared by training, evaluation and the serving
    signature so that they all see the same pixels. Cdiscount pictures are 180x180, so at the
    default size the resize branch never runs.
    """
    image = tf.io.decode_jpeg(jpeg, channels=3, dct_method=_DCT_METHOD,
                              try_recover_truncated=_TRY_RECOVER_TRUNCATED,
                              acceptable_fraction=_ACCEPTABLE_FRACTION)
    same = tf.reduce_all(tf.equal(tf.shape(image)[:2], image_size))
    image = tf.cond(same, lambda: image, lambda: _resize(image, image_size))
    return tf.ensure_shape(image, [image_size, image_size, 3])


def _resize(image: tf.Tensor, size: int) -> tf.Tensor:
    # Antialiasing matters when shrinking (a plain bilinear tap would alias); round, don't truncate.
    resized = tf.image.resize(image, [size, size], method="bilinear", antialias=True)
    return tf.saturate_cast(tf.round(resized), tf.uint8)


def random_augmentation(seed: tf.Tensor, shape, *, image_size: int, crop_size: int | None = None,
                        flip: bool = True) -> tuple[tf.Tensor, tf.Tensor]:
    """Random parameters for a [*shape] block of images: (mirror: bool [*shape], offset: int32
    [*shape, 2], the top-left corner of the crop_size window in the image_size picture).

    Drawn for a whole batch at once from one [2] seed (stateless: reproducible, safe in parallel
    maps): two vectorised ops instead of a dozen small random ops per image. Without crop_size
    the offset is 0; with flip=False no image is mirrored.
    """
    seeds = tf.random.experimental.stateless_split(seed, num=2)
    shape = tf.convert_to_tensor(shape, tf.int32)
    mirror = tf.random.stateless_uniform(shape, seeds[0]) < 0.5 if flip else tf.zeros(shape, tf.bool)
    offset_shape = tf.concat([shape, [2]], 0)
    if crop_size:
        offset = tf.random.stateless_uniform(offset_shape, seeds[1], minval=0,
                                             maxval=image_size - crop_size + 1, dtype=tf.int32)
    else:
        offset = tf.zeros(offset_shape, tf.int32)
    return mirror, offset


def augment_image(image: tf.Tensor, mirror: tf.Tensor | None, offset: tf.Tensor,
                  crop_size: int | None = None) -> tf.Tensor:
    """uint8 [H, W, 3] -> its crop_size window at `offset` (or the whole image), mirrored
    left-right when `mirror` (None: no mirror step at all). Pure; `random_augmentation` draws
    the parameters.

    The crop is a slice of the full decode. `decode_and_crop_jpeg` would save that copy (~35 us)
    but its window's edge columns come out up to 42 levels off (libjpeg upsamples the chroma at
    the window's edge by replication), so a crop would not be a crop of the picture."""
    if crop_size:
        image = tf.slice(image, tf.concat([offset, [0]], 0), [crop_size, crop_size, 3])
    if mirror is None:
        return image
    return tf.cond(mirror, lambda: tf.reverse(image, [1]), lambda: image)


def augment(images: tf.Tensor, seed: tf.Tensor, *, crop_size: int | None = None,
            flip: bool = True) -> tf.Tensor:
    """Random crop_size windows and mirrors of every image of a uint8 [..., S, S, 3] stack.

    Zero (padded) slots stay exactly zero: a window or mirror of zeros is zeros. For eager use
    and tests; the pipeline draws the same parameters per batch and applies them while decoding.
    """
    images = tf.convert_to_tensor(images)
    size = images.shape[-2]
    shape = tf.shape(images)
    flat = tf.reshape(images, tf.concat([[-1], shape[-3:]], 0))
    mirror, offset = random_augmentation(seed, tf.shape(flat)[:1], image_size=size, crop_size=crop_size, flip=flip)
    side = crop_size or size
    out = tf.map_fn(lambda args: augment_image(args[0], args[1], args[2], crop_size),
                    (flat, mirror, offset), fn_output_signature=tf.TensorSpec([side, side, 3], tf.uint8))
    return tf.reshape(out, tf.concat([shape[:-3], [side, side, 3]], 0))


def decode_images(images: tf.Tensor, mask: tf.Tensor, image_size: int = 180, *,
                  crop_size: int | None = None, mirror: tf.Tensor | None = None,
                  offset: tf.Tensor | None = None,
                  parallel_decodes: int = _PARALLEL_DECODES) -> tf.Tensor:
    """string [B, M] JPEG slots (or one product's [M]) + mask -> uint8 [B, M, side, side, 3], zeros
    where mask is 0 (any mask: real slots need not come first).

    Only the real images are decoded, `parallel_decodes` at a time, into a pool whose element 0
    is a block of zeros; one gather then writes every slot of the output: a real slot from its
    image, a padded one from the zeros. So the padded stack is written once, and nothing is
    decoded, filled or looped over for a padded slot.

    Augmentation (training): `mirror` bool [B, M] and `offset` int32 [B, M, 2] from
    `random_augmentation`. Without an offset, a crop_size takes the centre window (evaluation and
    serving); without a mirror, no mirror step is built.
    """
    images, mask = tf.convert_to_tensor(images), tf.convert_to_tensor(mask)
    if images.shape.rank == 1:
        one = lambda t: None if t is None else tf.convert_to_tensor(t)[tf.newaxis]
        return decode_images(images[tf.newaxis], mask[tf.newaxis], image_size, crop_size=crop_size,
                             mirror=one(mirror), offset=one(offset), parallel_decodes=parallel_decodes)[0]
    side = crop_size or image_size
    real = tf.reshape(mask > 0, [-1])
    jpegs = tf.boolean_mask(tf.reshape(images, [-1]), real)
    mirrors = None if mirror is None else tf.boolean_mask(tf.reshape(mirror, [-1]), real)
    if crop_size and offset is not None:
        offsets = tf.boolean_mask(tf.reshape(offset, [-1, 2]), real)
        offset_of = lambda i: offsets[i]
    else:  # the centre window, or no crop at all: a constant, no per-image slicing
        centre = tf.constant([(image_size - crop_size) // 2 if crop_size else 0] * 2)
        offset_of = lambda i: centre
    count = tf.size(jpegs)

    zeros = tf.constant(0, tf.uint8, shape=[side, side, 3])  # a Const: no per-call fill
    pool = tf.TensorArray(tf.uint8, size=count + 1, element_shape=[side, side, 3]).write(0, zeros)

    def decode_next(i, pool):
        image = decode_image(jpegs[i], image_size)
        image = augment_image(image, None if mirrors is None else mirrors[i], offset_of(i), crop_size)
        return i + 1, pool.write(i + 1, image)

    _, pool = tf.while_loop(lambda i, _: i < count, decode_next, (0, pool),
                            parallel_iterations=parallel_decodes)
    place = tf.where(real, tf.cumsum(tf.cast(real, tf.int32)), 0)  # a slot's element in the pool
    stacked = tf.reshape(pool.gather(place), tf.concat([tf.shape(mask), [side, side, 3]], 0))
    return tf.ensure_shape(stacked, mask.shape.concatenate([side, side, 3]))


# ---------------------------------------------------------------------------------------------
# The pipeline


def create_dataset(
    file_pattern: str,
    *,
    batch_size: int,
    training: bool,
    image_size: int = 180,
    crop_size: int | None = None,
    flip: bool = True,
    shuffle_buffer: int = 2048,
    seed: int | None = None,
    input_context: tf.distribute.InputContext | None = None,
    max_images: int = record_schema.MAX_IMAGES,
    repeat: bool = False,
) -> tf.data.Dataset:
    """Batches of `(features, label)` from the TFRecord shards matching `file_pattern`.

    training=False: every record in file order then record order (files sorted by name), no
    shuffle, no augmentation, a short last batch kept. training=True: files and records shuffled,
    each image randomly cropped (crop_size) and mirrored (flip), batches of exactly batch_size
    (drop_remainder: static shapes for distribution and XLA).

    Image side: decoded images are brought to image_size (resized only when they differ). With a
    crop_size (<= image_size) the output side is crop_size in both modes: a random window in
    training, the centre window in evaluation, so the model sees one input shape throughout (the
    Kaggle top teams' recipe was random 160 px crops of the 180 px pictures). Without it, the
    side is image_size as CONTRACT section 3 states.

    seed: None draws fresh file order, shuffle and augmentation every run, with nondeterministic
    (faster) element order in training. An int makes training reproducible: the same seed gives
    the same batches, at the cost of deterministic ordering in the parallel stages.

    input_context (from `strategy.distribute_datasets_from_function`): this pipeline reads its
    share only. With at least as many files as pipelines the share is whole files (cheap: each
    file is read by one pipeline; shards are balanced by the converter); with fewer files every
    pipeline reads every file and keeps every n-th record of each (exact, costs redundant reads).
    batch_size is then the per-replica batch (`input_context.get_per_replica_batch_size`).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    if crop_size is not None and not 0 < crop_size <= image_size:
        raise ValueError(f"crop_size must be in 1..image_size ({image_size}), got {crop_size}")
    files = sorted(tf.io.gfile.glob(file_pattern))
    if not files:
        raise FileNotFoundError(f"no TFRecord file matches {file_pattern!r}")

    pipelines, pipeline_id = 1, 0
    if input_context is not None:
        pipelines, pipeline_id = input_context.num_input_pipelines, input_context.input_pipeline_id
    record_shards = pipelines > 1 and len(files) < pipelines
    if pipelines > 1 and not record_shards:
        files = files[pipeline_id::pipelines]  # before any shuffle, so the shares are disjoint

    @_plain
    def read(path):
        records = tf.data.TFRecordDataset(path)
        return records.shard(pipelines, pipeline_id) if record_shards else records

    ds = tf.data.Dataset.from_tensor_slices(files)
    if training:
        ds = ds.shuffle(len(files), seed=seed, reshuffle_each_iteration=True)
    if repeat:
        ds = ds.repeat()  # at file level: no drained buffers and no short batch at epoch ends
    if training:
        # Several files at once: parallel reads (latency on GCS) and a better mix for the shuffle.
        ds = ds.interleave(read, cycle_length=min(len(files), 16), num_parallel_calls=AUTOTUNE)
        ds = ds.shuffle(shuffle_buffer, seed=seed, reshuffle_each_iteration=True)
    else:
        ds = ds.flat_map(read)  # one file after the other: file order, then record order

    # A batch of records is one element from here on: one parse_example call and one decode
    # function per batch (per-product elements cost ~100 us each of tf.data and executor machinery,
    # half a JPEG decode). Parallelism comes from several batches in flight (the map's
    # num_parallel_calls) and several images decoding at once within each (parallel_decodes).
    # In training the batch's augmentation parameters come from a seed stream that gives new
    # numbers every epoch (stateful random ops in a map would replay the same numbers each epoch).
    ds = ds.batch(batch_size, drop_remainder=training)
    if training and (flip or crop_size):
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip(ds, seeds)

    @_plain
    def parse_and_decode(serialized, batch_seed=None):
        parsed = parse_batch(serialized, max_images)
        mirror = offset = None
        if batch_seed is not None:
            mirror, offset = random_augmentation(batch_seed, tf.shape(parsed[record_schema.IMAGES]),
                                                  image_size=image_size, crop_size=crop_size, flip=flip)
            mirror = mirror if flip else None  # else leave the mirror step out of the graph
            offset = offset if crop_size else None
        images = decode_images(parsed[record_schema.IMAGES], parsed[record_schema.MASK], image_size,
                               crop_size=crop_size, mirror=mirror, offset=offset)
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
