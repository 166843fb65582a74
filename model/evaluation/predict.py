"""The model over a split: each product's top-k classes and probabilities, in input order.

Only the top k are kept: the full [N, K] matrix of the real val split (~350k x 5,270) would not
fit in memory."""

from __future__ import annotations

import collections
import json
import os
import time

import numpy as np
import tensorflow as tf

from model import model_dir as model_dir_lib

TOP_K = 5


def load_model(model_dir: str):
    """model.keras plus the train config (image size, model config) that train.py wrote beside it."""
    import keras

    from model.network import multi_image  # noqa: F401  (registers the custom layers for deserialisation)

    with tf.io.gfile.GFile(os.path.join(model_dir, model_dir_lib.CONFIG_FILE)) as f:
        config = json.load(f)
    model = keras.models.load_model(os.path.join(model_dir, model_dir_lib.MODEL_FILE), compile=False)
    return model, config


def predict_top_k(model, dataset, *, k: int = TOP_K, flip_tta: bool = False, total: int | None = None,
                  progress_every: float = 10.0, log=print) -> dict:
    """Runs the model over (features, label) batches; returns per-product arrays in input order.

    flip_tta averages the softmax of each product and of its left-right mirror.
    """
    @tf.function
    def step(images, mask):
        probabilities = tf.nn.softmax(tf.cast(model({"images": images, "mask": mask}, training=False)["category"], tf.float32))
        if flip_tta:
            flipped = tf.reverse(images, axis=[3])  # [B, M, H, W, C]: W is axis 3
            logits = model({"images": flipped, "mask": mask}, training=False)["category"]
            probabilities = (probabilities + tf.nn.softmax(tf.cast(logits, tf.float32))) / 2.0
        top = tf.math.top_k(probabilities, k=min(k, probabilities.shape[-1]))
        return top.indices, top.values

    out = collections.defaultdict(list)
    start = last = time.perf_counter()
    done = 0
    for features, label in dataset:
        classes, probabilities = step(features["images"], features["mask"])
        out["product_id"].append(features["product_id"].numpy())
        out["label"].append(label.numpy())
        out["num_images"].append(features["mask"].numpy().sum(axis=1).round().astype(np.int64))
        out["top_classes"].append(classes.numpy())
        out["top_probabilities"].append(probabilities.numpy())
        done += len(label)
        now = time.perf_counter()
        if now - last >= progress_every:
            last = now
            of = f"/{total}" if total else ""
            log(f"  predicted {done}{of} products ({done / (now - start):.0f} products/s)")
    log(f"  predicted {done} products in {time.perf_counter() - start:.1f} s")
    if not out:
        return {"product_id": np.zeros([0], np.int64), "label": np.zeros([0], np.int64),
                "num_images": np.zeros([0], np.int64), "top_classes": np.zeros([0, k], np.int64),
                "top_probabilities": np.zeros([0, k], np.float32)}
    return {name: np.concatenate(parts) for name, parts in out.items()}
