"""The SavedModel that serves raw JPEG bytes: what a user deploys (docs/FORMATS.md section 4)."""

from __future__ import annotations

import keras
import tensorflow as tf

import record_schema
from model import input_pipeline, labels as labels_lib


def export_serving_model(model: keras.Model, labels: labels_lib.Labels, path: str, *, image_size: int,
                         crop_size: int = 0, top_k: int = 5) -> None:
    """SavedModel whose default signature maps raw JPEG bytes to the top-k category ids.

    serving_default(images: string [B, 4], mask: float32 [B, 4]) ->
        {"category_ids": int64 [B, k], "probabilities": float32 [B, k], "classes": int32 [B, k]}
    Decoding is the input pipeline's own function, so serving sees exactly what training saw.
    """
    top_k = min(top_k, labels.num_classes)
    category_ids = tf.constant(labels.category_ids, dtype=tf.int64)
    n = record_schema.MAX_IMAGES

    def serve(images, mask):
        # The evaluation decoding of the input pipeline: resize to image_size, centre crop_size.
        decoded = input_pipeline.decode_images(images, mask, image_size, crop_size=crop_size or None)
        logits = model({"images": decoded, "mask": mask}, training=False)["category"]
        probabilities = tf.nn.softmax(tf.cast(logits, tf.float32))
        top = tf.math.top_k(probabilities, k=top_k)
        return {
            "category_ids": tf.gather(category_ids, top.indices),
            "probabilities": top.values,
            "classes": top.indices,
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
