"""The SavedModel that serves raw JPEG bytes: what a user deploys (docs/FORMATS.md section 4)."""

from __future__ import annotations

import keras
import tensorflow as tf

import record_schema
from model.input_pipeline import decode
from model.input_pipeline.labels import Labels

# The converter's first two checks (beam_convert/jpeg_check.py), in TensorFlow ops: decode_jpeg
# also takes PNG and GIF, and fills a truncated picture with grey instead of failing.
_SOI = b"\xff\xd8\xff"
_EOI = b"\xff\xd9"
_EOI_SEARCH_BYTES = 64
# A slot whose markers are right and that the project's decode still fails on (libjpeg gives up
# on it even with try_recover_truncated, which a merely truncated picture survives).
_UNDECODABLE = "corrupt JPEG (does not decode)"
# A slot whose frame header declares more pixels than any side decodes (record_schema): never decoded.
TOO_LARGE = f"image too large (its header declares over {record_schema.MAX_IMAGE_PIXELS} pixels, the limit)"


def check_slots(images: tf.Tensor, mask: tf.Tensor, decodes: tf.Tensor | None = None,
                too_large: tf.Tensor | None = None) -> tuple[tf.Tensor, tf.Tensor]:
    """string [B, M] JPEG slots + mask [+ decodes, too_large] -> (valid bool [B], error string [B], "" where valid).

    A product is valid when it has a real slot and every real slot starts like a JPEG and ends
    with its end-of-image marker, given `too_large` (bool [B, M] from `slots_too_large`) is not too
    large, and, given `decodes` (bool [B, M] from `slots_that_decode`), decodes; else its error
    names the first bad slot. The serving signature decodes only the products whose markers and
    sizes are all right, so a product with a bad marker is named by its first bad marker.
    """
    reason = _marker_reasons(images)
    if too_large is not None:
        reason = tf.where((reason == "") & too_large, TOO_LARGE, reason)
    if decodes is not None:
        reason = tf.where((reason == "") & ~decodes, _UNDECODABLE, reason)
    return _verdict(reason, mask)


def _marker_reasons(images: tf.Tensor) -> tf.Tensor:
    """string [B, M] -> string [B, M]: why a slot is not a JPEG by its markers, "" when it is."""
    length = tf.strings.length(images)
    starts = tf.strings.substr(images, tf.zeros_like(length), tf.fill(tf.shape(length), len(_SOI))) == _SOI
    tail_start = tf.maximum(length - _EOI_SEARCH_BYTES, 0)
    tails = tf.reshape(tf.strings.substr(images, tail_start, length - tail_start), [-1])
    ends = tf.reshape(tf.strings.split(tails, sep=_EOI).row_lengths() > 1, tf.shape(images))
    return tf.where(~starts, "not a JPEG (no FF D8 FF start)",
                    tf.where(~ends, "truncated JPEG (no FF D9 end marker)", ""))


def _verdict(reason: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """Each slot's reason ("" when good) + mask -> (valid [B], error [B]) naming the first bad real slot."""
    real = mask > 0.5
    bad = real & (reason != "")
    first_bad = tf.argmax(tf.cast(bad, tf.int32), axis=1, output_type=tf.int32)
    slot_error = tf.strings.join(["slot ", tf.strings.as_string(first_bad), ": ",
                                  tf.gather(reason, first_bad, batch_dims=1)])
    has_image = tf.reduce_any(real, axis=1)
    error = tf.where(~has_image, "no image (every mask is 0)",
                     tf.where(tf.reduce_any(bad, axis=1), slot_error, ""))
    return error == "", error


def slots_too_large(images: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """string [B, M] JPEG slots + mask -> bool [B, M]: True for a real slot whose frame header
    declares more than record_schema.MAX_IMAGE_PIXELS pixels (the converter's limit), read from the
    header alone (`tf.io.extract_jpeg_shape`): a decompression bomb is refused before any decode. A
    header that does not parse is not too large here; the decode check names it."""
    jpegs = tf.reshape(images, [-1])
    index = tf.where(tf.reshape(mask > 0, [-1]))[:, 0]
    parsed, shapes = _survivors(index, jpegs, lambda jpeg: tf.io.extract_jpeg_shape(jpeg, tf.int64))
    large = tf.boolean_mask(parsed, tf.reduce_prod(shapes[:, :2], axis=1) > record_schema.MAX_IMAGE_PIXELS)
    flags = tf.scatter_nd(large[:, tf.newaxis], tf.ones_like(large, tf.bool), tf.shape(jpegs, out_type=tf.int64))
    return tf.reshape(flags, tf.shape(images))


def slots_that_decode(images: tf.Tensor, mask: tf.Tensor, *, image_size: int) -> tf.Tensor:
    """string [B, M] JPEG slots + mask -> bool [B, M]: False for a real slot on which
    `decode.decode_images(..., image_size)` would fail, True for the others (padded slots are not
    decoded). Works inside a tf.function, so in the SavedModel.

    A failing decode is an op error, and an op error fails the whole call: `tf.cond` and
    `tf.map_fn` cannot catch it. The one place where a graph survives a failing op is a tf.data
    pipeline, whose `ignore_errors` drops the element that failed and goes on; so each real slot is
    an element (its index and bytes) of a small dataset built on the call, and the indices that come
    out are the slots that decode.

    The decodes are the ones `decode_images` does, with the project's decoder settings: a
    picture at the DCT ratio (`decode.decode_jpeg`), and for a picture that does not come out at
    the standard side then (decode_images' slow path, none in Cdiscount's catalogue) its whole
    `decode.decode_image`, which decodes it again in full when the ratio is not 1. A slot that
    passes is decoded again by decode_images: two decodes of each picture rather than one, and
    still the cheaper way: a pipeline made on every call instantiates its functions afresh each
    time, a few ms for one decode_jpeg but ~40 ms for decode_images. On 32 products (2 cores) this
    check added ~10-18 ms a call; decoding the batch itself inside tf.data added ~80-130 ms.
    """
    real = tf.reshape(mask > 0, [-1])
    index = tf.where(real)[:, 0]
    jpegs = tf.reshape(images, [-1])
    ratio = decode.dct_ratio(image_size)
    standard = -(-record_schema.IMAGE_SIZE // ratio)  # the side of a Cdiscount picture at that ratio
    # The decode's shape: cheap to stack, and it makes the decode an output (a map whose outputs do
    # not depend on the decode would not run it).
    decoded, shapes = _survivors(index, jpegs, lambda jpeg: tf.shape(decode.decode_jpeg(jpeg, ratio)))
    if ratio > 1:
        odd = tf.reduce_any(shapes[:, :2] != standard, axis=1)

        def decode_odd_again():
            odd_index = tf.boolean_mask(decoded, odd)
            # A pixel of the picture: the decode is an output, at the cost of one byte.
            full, _ = _survivors(odd_index, jpegs, lambda jpeg: decode.decode_image(jpeg, image_size)[0, 0])
            return tf.concat([tf.boolean_mask(decoded, ~odd), full], 0)

        decoded = tf.cond(tf.reduce_any(odd), decode_odd_again, lambda: decoded)
    ok = tf.tensor_scatter_nd_update(~real, decoded[:, tf.newaxis], tf.ones_like(decoded, tf.bool))
    return tf.reshape(ok, tf.shape(images))


def _survivors(index: tf.Tensor, jpegs: tf.Tensor, decode_one) -> tuple[tf.Tensor, tf.Tensor]:
    """int64 [N] slot indices into string jpegs -> (the indices on which decode_one succeeded,
    int64 [S], in any order; decode_one's outputs for them, stacked)."""
    dataset = (tf.data.Dataset.from_tensor_slices((index, tf.gather(jpegs, index)))
               .map(lambda i, jpeg: (i, decode_one(jpeg)), num_parallel_calls=tf.data.AUTOTUNE,
                    deterministic=False)
               .ignore_errors()
               .batch(_ALL)
               .with_options(_ONE_SHOT))
    survivors = iter(dataset).get_next_as_optional()  # no value when no slot decoded
    element_spec = dataset.element_spec
    none = tuple(tf.zeros([0] + spec.shape[1:].as_list(), spec.dtype) for spec in element_spec)
    return tf.cond(survivors.has_value(), survivors.get_value, lambda: none)


def _probabilities(model: keras.Model, images: tf.Tensor, mask: tf.Tensor) -> tf.Tensor:
    """The category softmax, in float32 whatever the model's compute dtype."""
    logits = model({"images": images, "mask": mask}, training=False)["category"]
    return tf.nn.softmax(tf.cast(logits, tf.float32))


_ALL = 1 << 30  # one batch holds every element
# A pipeline built, run once and dropped on every call: its static rewrites and autotuning cost more
# than they save (~10 ms a call). The map still runs in parallel (tf.data's default for AUTOTUNE).
_ONE_SHOT = tf.data.Options()
_ONE_SHOT.experimental_optimization.apply_default_optimizations = False
_ONE_SHOT.autotune.enabled = False


def export_serving_model(model: keras.Model, labels: Labels, path: str, *, image_size: int,
                         crop_size: int = 0, top_k: int = 5, flip_tta: bool = False) -> None:
    """SavedModel whose default signature maps raw JPEG bytes to the top-k category ids.

    serving_default(images: string [B, 4], mask: float32 [B, 4]) ->
        {"category_ids": int64 [B, k], "probabilities": float32 [B, k], "classes": int32 [B, k],
         "valid": bool [B], "error": string [B]}
    A product whose slots are not all JPEGs that decode (or that has no image) gets valid=False, its
    error, category_ids and classes -1 and probabilities 0, and the rest of the batch is answered as
    if alone. Decoding is the input pipeline's own function, so serving sees exactly what training saw.

    flip_tta: the probabilities are the average of the softmax of the pictures and of their
    left-right mirror, as `evaluate.py --flip_tta` computes them (model/evaluation/predict.py):
    the server then answers what that evaluation measured, at twice the model's work a call.

    serving_info() -> {"flip_tta": bool, "image_size": int32, "crop_size": int32}: what the export
    does, for a client (model/commands/predict.py prints it) or a server that must tell one export from another.
    """
    top_k = min(top_k, labels.num_classes)
    category_ids = tf.constant(labels.category_ids, dtype=tf.int64)

    def serve(images, mask):
        # The slots the model reads (mask > 0.5, as its fusion does) are the only ones decoded.
        mask = tf.where(mask > 0.5, mask, 0.0)
        # The markers first: a product with a bad one is not decoded, nor one whose header declares
        # too many pixels. Then each real slot of the others is tried alone, so a slot that fails
        # fails its own product only.
        valid, _ = check_slots(images, mask)
        too_large = slots_too_large(images, mask * tf.cast(valid, mask.dtype)[:, None])
        valid, _ = check_slots(images, mask, too_large=too_large)
        decodes = slots_that_decode(images, mask * tf.cast(valid, mask.dtype)[:, None], image_size=image_size)
        valid, error = check_slots(images, mask, decodes, too_large)
        mask = mask * tf.cast(valid, mask.dtype)[:, None]  # an invalid product's slots are not decoded
        # The evaluation decoding of the input pipeline: resize to image_size, centre crop_size.
        decoded = decode.decode_images(images, mask, image_size, crop_size=crop_size or None)
        probabilities = _probabilities(model, decoded, mask)
        if flip_tta:  # evaluate's flip TTA: the mirror of the same decoded pixels (W is axis 3)
            mirrored = _probabilities(model, tf.reverse(decoded, axis=[3]), mask)
            probabilities = (probabilities + mirrored) / 2.0
        top = tf.math.top_k(probabilities, k=top_k)
        answered = valid[:, None]
        return {
            "category_ids": tf.where(answered, tf.gather(category_ids, top.indices), tf.constant(-1, tf.int64)),
            "probabilities": tf.where(answered, top.values, 0.0),
            "classes": tf.where(answered, top.indices, -1),
            "valid": valid,
            "error": error,
        }

    settings = {"flip_tta": bool(flip_tta), "image_size": int(image_size), "crop_size": int(crop_size or 0)}
    _write_archive(model, serve, settings, path)


def _write_archive(model: keras.Model, serve, settings: dict, path: str) -> None:
    """The SavedModel at `path` (replacing one there): serve(images, mask) as serving_default, and
    serving_info() answering `settings`."""
    n = record_schema.MAX_IMAGES
    archive = keras.export.ExportArchive()
    archive.track(model)
    archive.add_endpoint(
        "serve",  # the first endpoint is also written as serving_default
        serve,
        input_signature=[
            tf.TensorSpec([None, n], tf.string, name="images"),
            tf.TensorSpec([None, n], tf.float32, name="mask"),
        ],
    )
    archive.add_endpoint("serving_info", lambda: {name: tf.constant(value) for name, value in settings.items()},
                         input_signature=[])
    if tf.io.gfile.exists(path):
        tf.io.gfile.rmtree(path)
    archive.write_out(path, verbose=False)
