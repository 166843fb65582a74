"""Pooling a product's per-image features (or per-image logits) under its image mask.

`features` is [B, M, D], `mask` [B, M] with 1.0 for a real image and 0.0 for a padded slot.
Padded slots never reach an output: they are replaced by 0 (sums), by the lowest float (max,
softmax scores) or by a zero probability (late fusion) before any reduction, so whatever the
backbone made of them does not matter. A product has >= 1 real image; a row with none still
gives finite numbers (zeros) rather than NaN, so one bad record cannot poison a batch.

The functions are written with keras.ops so they run eagerly and inside the small layers below,
which exist only to put them in a functional model that `.keras` files can save and load. Their
second input is called `image_mask`, not `mask`: Keras gives a `mask` argument its own
(sequence-masking) meaning.
"""

from __future__ import annotations

import keras
from keras import ops

FUSIONS = ("mean", "max", "mean_max", "gated", "late")


def masked_mean(features, mask):
    real = ops.expand_dims(_real(mask), -1)
    total = ops.sum(ops.where(real, features, ops.zeros_like(features)), axis=1)
    return total / ops.maximum(ops.sum(ops.cast(real, features.dtype), axis=1), 1.0)


def masked_max(features, mask):
    real = ops.expand_dims(_real(mask), -1)
    lowest = ops.full_like(features, _lowest(features.dtype))
    pooled = ops.max(ops.where(real, features, lowest), axis=1)
    return ops.where(ops.any(real, axis=1), pooled, ops.zeros_like(pooled))


def masked_softmax(scores, mask):
    """Softmax over the image axis of [B, M] scores, zero weight for padded slots."""
    real = _real(mask)
    scores = ops.where(real, scores, ops.full_like(scores, _lowest(scores.dtype)))
    # exp(lowest - max) underflows to exactly 0, so padded slots get no weight at all.
    return ops.softmax(scores, axis=1) * ops.cast(real, scores.dtype)


def attention_pool(features, scores, mask):
    weights = ops.expand_dims(masked_softmax(scores, mask), -1)
    real = ops.expand_dims(_real(mask), -1)
    # where, not a product with the zero weight: 0 * inf would still be NaN.
    return ops.sum(ops.where(real, features * weights, ops.zeros_like(features)), axis=1)


def late_log_probs(logits, mask):
    """log(mean over real images of softmax(logits)): [B, M, K] -> [B, K].

    Stays usable as logits for a from_logits loss (softmax of a log-probability vector is the
    vector's probabilities), and is computed as a log-sum-exp so it never takes log(0).
    """
    log_probs = ops.log_softmax(logits, axis=-1)
    real = ops.expand_dims(_real(mask), -1)
    log_probs = ops.where(real, log_probs, ops.full_like(log_probs, _lowest(log_probs.dtype)))
    count = ops.sum(ops.cast(real, log_probs.dtype), axis=1)
    return ops.logsumexp(log_probs, axis=1) - ops.log(ops.maximum(count, 1.0))


def _real(mask):
    return ops.greater(mask, 0.5)


def _lowest(dtype) -> float:
    # Finite (no inf - inf = NaN on a row without real images), yet below any real score or
    # log-probability by orders of magnitude; float16 cannot hold -1e30.
    return -3.0e4 if keras.backend.standardize_dtype(dtype) == "float16" else -1.0e30


@keras.saving.register_keras_serializable(package="cdiscount")
class MaskedPooling(keras.layers.Layer):
    """mean, max or mean_max (their concatenation) pooling: [B, M, D], [B, M] -> [B, D or 2D]."""

    def __init__(self, mode: str, **kwargs):
        # float32 whatever the global policy: the sums and the max are cheap and precision is free.
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        if mode not in ("mean", "max", "mean_max"):
            raise ValueError(f"MaskedPooling mode must be mean, max or mean_max, got {mode!r}")
        self.mode = mode

    def call(self, features, image_mask):
        features = ops.cast(features, self.compute_dtype)
        if self.mode == "mean":
            return masked_mean(features, image_mask)
        if self.mode == "max":
            return masked_max(features, image_mask)
        pooled = [masked_mean(features, image_mask), masked_max(features, image_mask)]
        return ops.concatenate(pooled, axis=-1)

    def compute_output_shape(self, features_shape, image_mask_shape):
        depth = features_shape[-1] * (2 if self.mode == "mean_max" else 1)
        return (features_shape[0], depth)

    def get_config(self):
        return {**super().get_config(), "mode": self.mode}


@keras.saving.register_keras_serializable(package="cdiscount")
class GatedPooling(keras.layers.Layer):
    """Attention pooling: a learned linear score per image, softmax over the real images only."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)
        self.score = keras.layers.Dense(1, name="score", dtype=self.dtype_policy)

    def build(self, features_shape, image_mask_shape=None):
        self.score.build(features_shape)

    def call(self, features, image_mask):
        features = ops.cast(features, self.compute_dtype)
        scores = ops.squeeze(self.score(features), -1)
        return attention_pool(features, scores, image_mask)

    def compute_output_shape(self, features_shape, image_mask_shape):
        return (features_shape[0], features_shape[-1])


@keras.saving.register_keras_serializable(package="cdiscount")
class LateFusion(keras.layers.Layer):
    """Averages per-image class probabilities over real images; returns their log, [B, K]."""

    def __init__(self, **kwargs):
        kwargs.setdefault("dtype", "float32")
        super().__init__(**kwargs)

    def call(self, logits, image_mask):
        return late_log_probs(ops.cast(logits, self.compute_dtype), image_mask)

    def compute_output_shape(self, logits_shape, image_mask_shape):
        return (logits_shape[0], logits_shape[-1])
