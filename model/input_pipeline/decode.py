"""Records to pixels, batch by batch: parse a batch of serialized Examples, decode its real
JPEGs at the size training needs, crop, and lay out the padded stack. Pure functions: each works
eagerly and inside tf.data / tf.function, and the serving signature (model/export.py) decodes
with the same ones.

The host does only what only the host can (issue 11): decoding, the crop, the padded stack. The
random mirror is the model's first step (multi_image.ImageEncoder, training only), where an
accelerator does it almost for free and on the image at the backbone's size; here TensorFlow's
uint8 `reverse` cost a third of a decode. Smaller sizes decode smaller: libjpeg's scaled inverse
DCT decodes a 180 px picture straight to 90, 45 or 23 px (`dct_ratio`), so 90 px costs less than
180 px instead of three times more (a full decode plus an antialiased resize).

"""

from __future__ import annotations

import tensorflow as tf

import record_schema

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


def dct_ratio(image_size: int, stored_size: int = record_schema.IMAGE_SIZE) -> int:
    """The largest libjpeg DCT scaling denominator (1, 2, 4 or 8) whose decode of a stored_size
    picture, ceil(stored_size / ratio) pixels a side, is still >= image_size: 1 down to 91 px,
    2 for 90-46 px, 4 for 45-23 px, 8 below."""
    return next(r for r in (8, 4, 2, 1) if -(-stored_size // r) >= image_size)


def decode_image(jpeg: tf.Tensor, image_size: int) -> tf.Tensor:
    """One JPEG -> uint8 [image_size, image_size, 3].

    The single definition of the pixels, shared by training, evaluation and the serving signature
    (`decode_images` produces exactly these pixels, batch by batch). A Cdiscount picture
    (record_schema.IMAGE_SIZE, 180 px) is decoded by libjpeg straight at 1/`dct_ratio` of its
    size (the scaled inverse DCT averages the pixels on the way, at a fraction of the cost of a
    full decode), then brought the rest of the way (less than 2x) by a plain bilinear resize, or
    not resized at all when that is already image_size (180, 90, 45 px). Any other picture size
    is decoded in full and resized with antialiasing (correct for any scale, and slower).
    """
    ratio, scaled = _scaling(image_size)
    image = decode_jpeg(jpeg, ratio)
    image = tf.cond(_is_standard(image, scaled), lambda: _finish(image, image_size),
                    lambda: _decode_any(jpeg, image_size, image if ratio == 1 else None))
    return tf.ensure_shape(image, [image_size, image_size, 3])


def _scaling(image_size: int) -> tuple[int, int]:
    """(DCT ratio, side of a standard picture decoded at that ratio)."""
    ratio = dct_ratio(image_size)
    return ratio, -(-record_schema.IMAGE_SIZE // ratio)


def decode_jpeg(jpeg: tf.Tensor, ratio: int = 1) -> tf.Tensor:
    """One JPEG -> uint8 [ceil(H / ratio), ceil(W / ratio), 3] with the pipeline's decoder settings
    (also the benchmark's ceiling: bench/pipeline_benchmark.py)."""
    return tf.io.decode_jpeg(jpeg, channels=3, ratio=ratio, dct_method=_DCT_METHOD,
                             try_recover_truncated=_TRY_RECOVER_TRUNCATED,
                             acceptable_fraction=_ACCEPTABLE_FRACTION)


def _is_standard(image: tf.Tensor, scaled: int) -> tf.Tensor:
    return tf.reduce_all(tf.equal(tf.shape(image)[:2], scaled))


def _finish(images: tf.Tensor, image_size: int) -> tf.Tensor:
    """Standard pictures at the DCT-scaled side ([..., S, S, 3], one or a batch) -> image_size.

    Plain bilinear (2x2 taps, half-pixel centres): less than a factor 2 is left after the DCT
    scaling, which has already averaged the pixels (close to a 2x2 box), so the picture does not
    alias the way a plain bilinear shrink of the full decode does. Measured on the 110 sample
    pictures at 48 px, mean distance to a high-quality (Lanczos) resize of the full picture: 3.7
    levels; the earlier full decode + antialiased resize 3.1; a plain bilinear shrink of the full
    decode 6.5. An area resize here would be closer (2.6) but costs ~30 us an image against ~17,
    which takes the 48 px pipeline from ~1.2x the full-size decode ceiling to ~1.05x
    (bench/RESULTS_pipeline.md). Per image or on a batch, the same op gives the same pixels."""
    if images.shape[-2] == image_size:
        return images
    resized = tf.image.resize(images, [image_size, image_size], method="bilinear", antialias=False)
    return _to_uint8(resized)


def _decode_any(jpeg: tf.Tensor, image_size: int, full: tf.Tensor | None = None) -> tf.Tensor:
    """A picture of any size -> image_size: full decode, then an antialiased resize (identity when
    the sizes already match), as a shrink of any factor needs."""
    full = decode_jpeg(jpeg, 1) if full is None else full
    resized = tf.image.resize(full, [image_size, image_size], method="bilinear", antialias=True)
    return _to_uint8(resized)


def _to_uint8(pixels: tf.Tensor) -> tf.Tensor:
    return tf.saturate_cast(tf.round(pixels), tf.uint8)  # round, don't truncate


def random_offsets(seed: tf.Tensor, shape, *, image_size: int, crop_size: int) -> tf.Tensor:
    """int32 [*shape, 2]: random top-left corners of crop_size windows in image_size pictures,
    for a [*shape] block of images.

    Drawn for a whole batch at once from one [2] seed (stateless: reproducible, safe in parallel
    maps): one vectorised op instead of small random ops per image."""
    offset_shape = tf.concat([tf.convert_to_tensor(shape, tf.int32), [2]], 0)
    return tf.random.stateless_uniform(offset_shape, seed, minval=0, maxval=image_size - crop_size + 1,
                                       dtype=tf.int32)


def _crop(image: tf.Tensor, corner: tf.Tensor, crop_size: int | None) -> tf.Tensor:
    """uint8 [H, W, 3] -> its crop_size window whose top-left `corner` is int32 [top, left, 0]
    (or the whole image).

    The crop is a slice of the decode. `decode_and_crop_jpeg` would save that copy (~35 us)
    but its window's edge columns come out up to 42 levels off (libjpeg upsamples the chroma at
    the window's edge by replication), so a crop would not be a crop of the picture. A strided
    slice, not tf.slice: it clamps a window that overruns a picture of an unexpected size (whose
    batch then takes the slow path, see decode_images) where tf.slice would fail."""
    if not crop_size:
        return image
    return tf.strided_slice(image, corner, corner + [crop_size, crop_size, 3])


def _crop_batch(images: tf.Tensor, offsets: tf.Tensor, crop_size: int) -> tf.Tensor:
    """uint8 [N, S, S, 3] -> [N, crop_size, crop_size, 3], image n's window at offsets[n]: two
    batched gathers (rows, then columns), exact copies."""
    window = tf.range(crop_size)
    rows = tf.gather(images, offsets[:, :1] + window, axis=1, batch_dims=1)
    return tf.gather(rows, offsets[:, 1:] + window, axis=2, batch_dims=1)


def decode_images(images: tf.Tensor, mask: tf.Tensor, image_size: int = record_schema.IMAGE_SIZE, *,
                  crop_size: int | None = None, offset: tf.Tensor | None = None,
                  parallel_decodes: int = _PARALLEL_DECODES) -> tf.Tensor:
    """string [B, M] JPEG slots (or one product's [M]) + mask -> uint8 [B, M, side, side, 3], zeros
    where mask is 0 (any mask: real slots need not come first). side = crop_size or image_size.

    Every real image comes out as `decode_image` makes it (same pixels), then cropped. Only the
    real images are decoded, `parallel_decodes` at a time, into a pool whose element 0 is a block
    of zeros; one gather then writes every slot of the output: a real slot from its image, a
    padded one from the zeros. So the padded stack is written once, and nothing is decoded,
    filled or looped over for a padded slot.

    Batch by batch rather than image by image: the loop decodes every picture at the DCT ratio
    and only notes whether all came out at the standard side; then one branch for the whole batch
    either finishes the pool (one batched resize when image_size is not the scaled side, e.g. 48
    px from a 90 px decode, and the crops) or, for a batch holding a picture of another size
    (none in Cdiscount's catalogue), decodes it again image by image through `decode_image`. A
    branch per image, even untaken, ran at 0.74x the decode ceiling at 180 px where this runs at
    ~1x (bench/RESULTS_pipeline.md).

    Crop (crop_size): the crop_size window of the image_size picture; at `offset` (int32
    [B, M, 2] from `random_offsets`, training) or, without one, the centre window (evaluation and
    serving).
    """
    images, mask = tf.convert_to_tensor(images), tf.convert_to_tensor(mask)
    if images.shape.rank == 1:
        one = None if offset is None else tf.convert_to_tensor(offset)[tf.newaxis]
        return decode_images(images[tf.newaxis], mask[tf.newaxis], image_size, crop_size=crop_size,
                             offset=one, parallel_decodes=parallel_decodes)[0]
    side = crop_size or image_size
    real = tf.reshape(mask > 0, [-1])
    offsets = None  # int32 [N, 2], the real images' windows; None: the centre window
    if crop_size and offset is not None:
        offsets = tf.boolean_mask(tf.reshape(offset, [-1, 2]), real)
    batch = _RealImages(tf.boolean_mask(tf.reshape(images, [-1]), real), offsets, image_size, crop_size,
                        parallel_decodes)
    place = tf.where(real, tf.cumsum(tf.cast(real, tf.int32)), 0)  # a slot's element in the pool
    out_shape = tf.concat([tf.shape(mask), [side, side, 3]], 0)
    pool, all_standard = batch.decode_at_scale()
    stacked = tf.reshape(tf.cond(all_standard, lambda: batch.finish(pool, place), lambda: batch.slow(place)),
                         out_shape)
    return tf.ensure_shape(stacked, mask.shape.concatenate([side, side, 3]))


class _RealImages:
    """The real images of a batch (`decode_images`): decoded into a pool whose element 0 is a
    block of zeros, then gathered into the padded stack."""

    def __init__(self, jpegs: tf.Tensor, offsets: tf.Tensor | None, image_size: int, crop_size: int | None,
                 parallel_decodes: int):
        self.jpegs, self.offsets = jpegs, offsets
        self.image_size, self.crop_size, self.parallel_decodes = image_size, crop_size, parallel_decodes
        self.side = crop_size or image_size
        self.ratio, self.scaled = _scaling(image_size)
        self.resize = self.scaled != image_size
        self.count = tf.size(jpegs)
        if crop_size and offsets is not None:
            corners = tf.pad(offsets, [[0, 0], [0, 1]])
            self.corner_of = lambda i: corners[i]
        else:  # the centre window, or no crop at all: a constant
            centre = tf.constant([(image_size - crop_size) // 2 if crop_size else 0] * 2 + [0])
            self.corner_of = lambda i: centre

    def decode_at_scale(self) -> tuple[tf.TensorArray, tf.Tensor]:
        """(the pool of every image decoded at the DCT ratio, whether all came out at the standard side).

        With a resize still to come the pool holds the decodes at the scaled side and the crop
        waits for the resize; without one, the crop is taken here. The pool's element shape is
        left open so that an odd picture can go in; the batch then takes the slow path."""
        pool_side = self.scaled if self.resize else self.side
        zeros = tf.constant(0, tf.uint8, shape=[pool_side, pool_side, 3])  # a Const: no per-call fill
        pool = tf.TensorArray(tf.uint8, size=self.count + 1, infer_shape=False).write(0, zeros)

        def decode_next(i, smallest, largest, pool):
            image = decode_jpeg(self.jpegs[i], self.ratio)
            shape = tf.shape(image)
            if not self.resize:
                image = _crop(image, self.corner_of(i), self.crop_size)
            return i + 1, tf.minimum(smallest, shape), tf.maximum(largest, shape), pool.write(i + 1, image)

        standard = tf.constant([self.scaled, self.scaled, 3])
        _, smallest, largest, pool = tf.while_loop(
            lambda i, *_: i < self.count, decode_next, (0, standard, standard, pool),
            parallel_iterations=self.parallel_decodes)
        # Every decode had the standard shape iff the smallest and the largest of them had.
        return pool, tf.reduce_all(tf.equal(smallest, standard) & tf.equal(largest, standard))

    def finish(self, pool: tf.TensorArray, place: tf.Tensor) -> tf.Tensor:
        """The fast path's stack: the pool resized (when image_size is not the scaled side) and cropped."""
        if not self.resize:
            return pool.gather(place)
        crop_size, image_size = self.crop_size, self.image_size
        done = _finish(tf.ensure_shape(pool.stack(), [None, self.scaled, self.scaled, 3]), image_size)
        if crop_size and self.offsets is not None:
            done = _crop_batch(done, tf.concat([[[0, 0]], self.offsets], 0), crop_size)
        elif crop_size:
            top = (image_size - crop_size) // 2
            done = done[:, top:top + crop_size, top:top + crop_size]
        return tf.gather(done, place)

    def slow(self, place: tf.Tensor) -> tf.Tensor:
        """A batch holding a picture of another size: every image again through `decode_image`."""
        side = self.side
        zeros = tf.constant(0, tf.uint8, shape=[side, side, 3])
        pool = tf.TensorArray(tf.uint8, size=self.count + 1, element_shape=[side, side, 3]).write(0, zeros)

        def decode_one(i, pool):
            image = _crop(decode_image(self.jpegs[i], self.image_size), self.corner_of(i), self.crop_size)
            return i + 1, pool.write(i + 1, image)

        _, pool = tf.while_loop(lambda i, _: i < self.count, decode_one, (0, pool),
                                parallel_iterations=self.parallel_decodes)
        return pool.gather(place)
