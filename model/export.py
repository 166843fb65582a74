"""The SavedModel that serves raw JPEG bytes: what a user deploys (docs/FORMATS.md section 4)."""

from __future__ import annotations

import keras
import tensorflow as tf

import record_schema
from model.input_pipeline import decode
from model.input_pipeline import labels as labels_lib

# The converter's first two checks (beam_convert/jpeg_check.py), in TensorFlow ops: decode_jpeg
# also takes PNG and GIF, and fills a truncated picture with grey instead of failing.
_SOI = b"\xff\xd8\xff"
_EOI = b"\xff\xd9"
_EOI_SEARCH_BYTES = 64


def check_slots(images: tf.Tensor, mask: tf.Tensor) -> tuple[tf.Tensor, tf.Tensor]:
    """string [B, M] JPEG slots + mask -> (valid bool [B], error string [B], "" where valid).

    A product is valid when it has a real slot and every real slot starts like a JPEG and ends
    with its end-of-image marker; else its error names the first bad slot.
    """
    real = mask > 0.5
    length = tf.strings.length(images)
    starts = tf.strings.substr(images, tf.zeros_like(length), tf.fill(tf.shape(length), len(_SOI))) == _SOI
    tail_start = tf.maximum(length - _EOI_SEARCH_BYTES, 0)
    tails = tf.reshape(tf.strings.substr(images, tail_start, length - tail_start), [-1])
    ends = tf.reshape(tf.strings.split(tails, sep=_EOI).row_lengths() > 1, tf.shape(images))
    reason = tf.where(~starts, "not a JPEG (no FF D8 FF start)",
                      tf.where(~ends, "truncated JPEG (no FF D9 end marker)", ""))
    bad = real & (reason != "")
    first_bad = tf.argmax(tf.cast(bad, tf.int32), axis=1, output_type=tf.int32)
    slot_error = tf.strings.join(["slot ", tf.strings.as_string(first_bad), ": ",
                                  tf.gather(reason, first_bad, batch_dims=1)])
    has_image = tf.reduce_any(real, axis=1)
    error = tf.where(~has_image, "no image (every mask is 0)",
                     tf.where(tf.reduce_any(bad, axis=1), slot_error, ""))
    return error == "", error


def export_serving_model(model: keras.Model, labels: labels_lib.Labels, path: str, *, image_size: int,
                         crop_size: int = 0, top_k: int = 5) -> None:
    """SavedModel whose default signature maps raw JPEG bytes to the top-k category ids.

    serving_default(images: string [B, 4], mask: float32 [B, 4]) ->
        {"category_ids": int64 [B, k], "probabilities": float32 [B, k], "classes": int32 [B, k],
         "valid": bool [B], "error": string [B]}
    A product whose slots are not all JPEGs (or that has no image) gets valid=False, its error,
    category_ids and classes -1 and probabilities 0, and the rest of the batch is answered as usual.
    Decoding is the input pipeline's own function, so serving sees exactly what training saw.
    """
    top_k = min(top_k, labels.num_classes)
    category_ids = tf.constant(labels.category_ids, dtype=tf.int64)
    n = record_schema.MAX_IMAGES

    def serve(images, mask):
        valid, error = check_slots(images, mask)
        mask = mask * tf.cast(valid, mask.dtype)[:, None]  # an invalid product's slots are not decoded
        # The evaluation decoding of the input pipeline: resize to image_size, centre crop_size.
        decoded = decode.decode_images(images, mask, image_size, crop_size=crop_size or None)
        logits = model({"images": decoded, "mask": mask}, training=False)["category"]
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32))
        top = tf.math.top_k(probabilities, k=top_k)
        answered = valid[:, None]
        return {
            "category_ids": tf.where(answered, tf.gather(category_ids, top.indices), tf.constant(-1, tf.int64)),
            "probabilities": tf.where(answered, top.values, 0.0),
            "classes": tf.where(answered, top.indices, -1),
            "valid": valid,
            "error": error,
        }

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
    if tf.io.gfile.exists(path):
        tf.io.gfile.rmtree(path)
    archive.write_out(path, verbose=False)
