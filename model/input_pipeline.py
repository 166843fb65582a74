"""TFRecord shards (record_schema) -> batches of padded product image stacks for Keras.

    features["images"]      uint8   [batch, max_images, side, side, 3], zeros where mask is 0
    features["mask"]        float32 [batch, max_images], 1.0 for a real image
    features["product_id"]  int64   [batch]
    label                   int64   [batch], -1 when unlabelled

`side` is `image_size`, or `crop_size` when one is given (see `create_dataset`).

Where the time goes, and so the shape of the pipeline: decoding a 180x180 JPEG costs ~150-300 us,
and an output stack is 4 x 97 KB per product of which only 1.7 images are real on average. Every
extra pass over that output (materialising zeros, stacking, scattering) costs a sizeable fraction
of a decode, and so does a `tf.map_fn` iteration (~25 us of while-loop machinery on this CPU).
So the pipeline parses serialized records a batch at a time (one `parse_example` call), then
decodes each product's real images in a per-product map whose branch is picked by the image count
(no decoder call, no loop and no zero tensor for a padded slot), and lets `padded_batch` write
each image once into the final batch buffer and zero-fill the padded slots in the same pass.
"""

from __future__ import annotations

import functools

import tensorflow as tf

import record_schema

AUTOTUNE = tf.data.AUTOTUNE
# The mapped functions hold no Python control flow on tensors (branches are explicit tf.cond /
# tf.switch_case), so AutoGraph has nothing to convert; skipping it saves seconds of tracing
# per dataset.
_plain = tf.autograph.experimental.do_not_convert

# TensorFlow's default ("") is libjpeg's IFAST; INTEGER_ACCURATE is ISLOW, what Pillow and most
# JPEG tools use: bit-identical to Pillow on the sample pictures (IFAST is off by up to 5 levels),
# so models trained here and any PIL-based tooling see the same pixels, for no measurable cost
# with libjpeg-turbo's SIMD ISLOW (bench/RESULTS_pipeline.md).
_DCT_METHOD = "INTEGER_ACCURATE"
# The record holds the BSON bytes verbatim. A truncated picture should cost one grey-bottomed image,
# not a multi-day training run or a submission missing rows; garbage still fails loudly.
_TRY_RECOVER_TRUNCATED = True
_ACCEPTABLE_FRACTION = 0.5

# Cap on the memory tf.data's autotuner may spend on buffers (prefetch, parallel map outputs). A
# batch of 64 products at 180 px is 25 MB; the default budget is half the host's RAM, which on a
# shared machine or with one pipeline per replica lets prefetch buffers grow far beyond any use.
_RAM_BUDGET = 2 << 30


# ---------------------------------------------------------------------------------------------
# Pure pieces: each works eagerly and inside tf.data / tf.function.


def parse_batch(serialized: tf.Tensor, max_images: int = record_schema.MAX_IMAGES) -> dict:
    """string [B] serialized records -> {"product_id", "label": int64 [B], "images": string [B, M],
    "mask": float32 [B, M]}.

    One `parse_example` per batch amortises the per-call cost that dominates per-record parsing.
    The decoder relies on the record's padding rule (real images first, CONTRACT section 2), so a
    record that breaks it fails here with a clear message rather than decoding the wrong slots.
    """
    parsed = tf.io.parse_example(serialized, record_schema.feature_spec(max_images))
    mask = parsed[record_schema.MASK]
    count = tf.reduce_sum(mask, axis=1, keepdims=True)
    prefix = tf.cast(tf.range(max_images, dtype=tf.int64)[tf.newaxis] < count, tf.int64)
    with tf.control_dependencies([tf.debugging.assert_equal(
            mask, prefix, message="record mask must be 1s then 0s (real images first, CONTRACT section 2)")]):
        mask = tf.cast(mask, tf.float32)
    return {
        record_schema.PRODUCT_ID: tf.reshape(parsed[record_schema.PRODUCT_ID], [-1]),
        record_schema.LABEL: tf.reshape(parsed[record_schema.LABEL], [-1]),
        record_schema.IMAGES: parsed[record_schema.IMAGES],
        record_schema.MASK: mask,
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


def center_crop(image: tf.Tensor, crop_size: int) -> tf.Tensor:
    """[..., H, W, C] -> [..., crop_size, crop_size, C], the evaluation counterpart of a random crop."""
    height, width = tf.shape(image)[-3], tf.shape(image)[-2]
    top, left = (height - crop_size) // 2, (width - crop_size) // 2
    return image[..., top:top + crop_size, left:left + crop_size, :]


def augment_image(image: tf.Tensor, seed: tf.Tensor, *, crop_size: int | None = None,
                  flip: bool = True) -> tf.Tensor:
    """One uint8 [H, W, 3] image -> a random crop_size window (or the whole image), randomly
    mirrored left-right. Stateless: the same seed ([2] int) gives the same result, so it is
    reproducible and safe in parallel maps; fresh seeds come from the pipeline per image."""
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, num=2))
    if crop_size is not None:
        image = tf.image.stateless_random_crop(image, [crop_size, crop_size, 3], seed=crop_seed)
    if flip:
        image = tf.image.stateless_random_flip_left_right(image, seed=flip_seed)
    return image


def augment(images: tf.Tensor, seed: tf.Tensor, *, crop_size: int | None = None,
            flip: bool = True) -> tf.Tensor:
    """`augment_image` on every image of a uint8 [..., H, W, 3] stack, each with its own seed.

    Zero (padded) slots stay exactly zero: a window or mirror of zeros is zeros. The pipeline
    itself calls `augment_image` on real images only and pads afterwards.
    """
    images = tf.convert_to_tensor(images)
    shape = tf.shape(images)
    flat = tf.reshape(images, tf.concat([[-1], shape[-3:]], 0))
    seeds = _image_seeds(seed, tf.shape(flat)[0])
    out_hw = [crop_size, crop_size] if crop_size else images.shape[-3:-1].as_list()
    out = tf.map_fn(lambda args: augment_image(args[0], args[1], crop_size=crop_size, flip=flip),
                    (flat, seeds), fn_output_signature=tf.TensorSpec(out_hw + [3], tf.uint8))
    out_shape = tf.concat([shape[:-3], [crop_size, crop_size, 3]], 0) if crop_size else shape
    return tf.reshape(out, out_shape)


def decode_product(images: tf.Tensor, mask: tf.Tensor, image_size: int, *,
                   crop_size: int | None = None, training: bool = False, flip: bool = True,
                   seed: tf.Tensor | None = None) -> tf.Tensor:
    """One product's string [M] slots + mask [M] -> uint8 [n, side, side, 3], its n real images.

    Real images come first (CONTRACT section 2), so the count picks a branch that decodes exactly
    those slots: padded slots never reach the decoder and no zeros are made here (`padded_batch`
    or `decode_images` pads). With training, each image gets its own random window of crop_size
    and mirror, drawn from `seed`; without, a crop_size is the centre window.
    """
    max_images = images.shape[0]
    count = tf.reduce_sum(tf.cast(mask > 0, tf.int32))
    if training and seed is None:  # eager convenience; the pipeline always passes one
        seed = tf.random.uniform([2], maxval=tf.int64.max, dtype=tf.int64)
    seeds = _image_seeds(seed, max_images) if training else tf.zeros([max_images, 2], tf.int64)
    side = crop_size or image_size
    one = _image_fn(image_size, crop_size, training, flip)

    def first(k):
        def branch():
            if k == 0:
                return tf.zeros([0, side, side, 3], tf.uint8)
            decoded = [one(images[i], seeds[i]) for i in range(k)]
            # One image (the common case) is expanded, not copied by a stack.
            return decoded[0][tf.newaxis] if k == 1 else tf.stack(decoded)
        return branch

    out = tf.switch_case(count, [first(k) for k in range(max_images + 1)])
    return tf.ensure_shape(out, [None, side, side, 3])


@functools.lru_cache(maxsize=None)
def _image_fn(image_size: int, crop_size: int | None, training: bool, flip: bool):
    """JPEG + seed -> one model-ready image, as a function traced once: the branches above call
    it 10 times, and inlining its graph in each made building a dataset take seconds."""

    @tf.function(autograph=False, input_signature=[tf.TensorSpec([], tf.string), tf.TensorSpec([2], tf.int64)])
    def one(jpeg, seed):
        image = decode_image(jpeg, image_size)
        if training:
            return augment_image(image, seed, crop_size=crop_size, flip=flip)
        return center_crop(image, crop_size) if crop_size else image

    return one


def decode_images(images: tf.Tensor, mask: tf.Tensor, image_size: int = 180, *,
                  crop_size: int | None = None) -> tf.Tensor:
    """string [B, M] (or [M]) + mask -> uint8 [B, M, side, side, 3], zeros where mask is 0.

    The deterministic (evaluation) decoding of whole batches, for the serving signature and for
    tests; pass the same image_size / crop_size as the evaluation pipeline to see its pixels. The
    pipeline does the same per product and pads in `padded_batch`, which is faster.
    """
    images, mask = tf.convert_to_tensor(images), tf.convert_to_tensor(mask)
    if images.shape.rank == 1:
        return decode_images(images[tf.newaxis], mask[tf.newaxis], image_size, crop_size=crop_size)[0]
    max_images = images.shape[1]
    side = crop_size or image_size
    real = tf.cast(mask > 0, tf.int32)
    count = tf.reduce_sum(real, axis=1, keepdims=True)
    check = tf.debugging.assert_equal(real, tf.cast(tf.range(max_images)[tf.newaxis] < count, tf.int32),
                                      message="mask must be 1s then 0s (real images first)")

    def product(args):
        decoded = decode_product(args[0], args[1], image_size, crop_size=crop_size)
        padding = max_images - tf.shape(decoded)[0]
        return tf.pad(decoded, [[0, padding], [0, 0], [0, 0], [0, 0]])

    with tf.control_dependencies([check]):
        return tf.map_fn(product, (images, mask),
                         fn_output_signature=tf.TensorSpec([max_images, side, side, 3], tf.uint8))


def _image_seeds(seed: tf.Tensor, count) -> tf.Tensor:
    """[count, 2] independent stateless seeds derived from one [2] seed."""
    return tf.random.stateless_uniform([count, 2], seed=seed, minval=None, maxval=None, dtype=tf.int64)


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

    # Parse a batch at a time, then go back to products for decoding. The parse batch carries
    # one [2] augmentation seed per product, drawn from a seeded stream that gives new numbers
    # every epoch (stateful random ops in a map would replay the same numbers each epoch).
    ds = ds.batch(batch_size)
    if training:
        seeds = tf.data.Dataset.random(seed=seed, rerandomize_each_iteration=True).batch(2)
        ds = tf.data.Dataset.zip(ds, seeds)

        @_plain
        def parse(serialized, batch_seed):
            parsed = parse_batch(serialized, max_images)
            parsed["seed"] = _image_seeds(batch_seed, tf.shape(serialized)[0])
            return parsed
    else:
        @_plain
        def parse(serialized):
            return parse_batch(serialized, max_images)
    ds = ds.map(parse, num_parallel_calls=AUTOTUNE).unbatch()

    @_plain
    def decode(product):
        images = decode_product(product[record_schema.IMAGES], product[record_schema.MASK], image_size,
                                crop_size=crop_size, training=training, flip=flip,
                                seed=product.get("seed"))
        features = {record_schema.IMAGES: images, record_schema.MASK: product[record_schema.MASK],
                    record_schema.PRODUCT_ID: product[record_schema.PRODUCT_ID]}
        return features, product[record_schema.LABEL]

    side = crop_size or image_size
    ds = ds.map(decode, num_parallel_calls=AUTOTUNE)
    ds = ds.padded_batch(
        batch_size,
        padded_shapes=({record_schema.IMAGES: [max_images, side, side, 3], record_schema.MASK: [max_images],
                        record_schema.PRODUCT_ID: []}, []),
        drop_remainder=training,
    )

    options = tf.data.Options()
    # Order only matters for evaluation (ids line up with predictions) and for seeded runs. In
    # training a slow file or image must not stall the others, so every parallel stage (the
    # interleave, both maps) may hand out elements as they finish.
    options.deterministic = not training or seed is not None
    options.autotune.ram_budget = _RAM_BUDGET
    # Parallelism comes from the parallel maps across products; letting single ops (resize,
    # padded_batch's copy) fan out inside an element only adds scheduling on a few cores.
    options.threading.max_intra_op_parallelism = 1
    # No private thread pool: on a CPU host the model step and the pipeline share the same cores
    # whatever the pools, and on an accelerator host the shared pool is the pipeline's anyway.
    if input_context is not None:
        # Sharded above; stop tf.distribute from sharding again should it be handed this dataset.
        options.experimental_distribute.auto_shard_policy = tf.data.experimental.AutoShardPolicy.OFF
    return ds.with_options(options).prefetch(AUTOTUNE)
