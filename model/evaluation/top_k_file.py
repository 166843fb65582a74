"""top_k.npz (evaluate.py --save_top_k=K, docs/FORMATS.md section 4): each product's K best
classes and their probabilities, so that evaluations can be blended offline without the models.

The probabilities are the model's (the ensemble's, combined as evaluate.py was told), before any
duplicate lookup: a blend of several files is then a blend of models, to which the lookup can be
applied again.
"""

from __future__ import annotations

import io

import numpy as np
import tensorflow as tf

FILE = "top_k.npz"

# array -> (dtype, shape), as documented in docs/FORMATS.md section 4.
ARRAYS = {
    "product_id": ("int64", "[N]"),
    "label": ("int64", "[N]"),
    "class_index": ("int64", "[N, K]"),
    "category_id": ("int64", "[N, K]"),
    "probability": ("float32", "[N, K]"),
}


def write_top_k(path: str, *, product_id, label, top_classes, top_probabilities, category_ids, k: int) -> None:
    """top_k.npz from the prediction arrays; `category_ids` maps class index -> Cdiscount id."""
    classes = np.asarray(top_classes, np.int64)[:, :k]
    arrays = {
        "product_id": np.asarray(product_id, np.int64),
        "label": np.asarray(label, np.int64),
        "class_index": classes,
        "category_id": np.asarray(category_ids, np.int64)[classes] if classes.size else classes.copy(),
        "probability": np.asarray(top_probabilities, np.float32)[:, :k],
    }
    buffer = io.BytesIO()
    np.savez_compressed(buffer, **arrays)
    with tf.io.gfile.GFile(path, "wb") as f:
        f.write(buffer.getvalue())


def read_top_k(path: str) -> dict:
    with tf.io.gfile.GFile(path, "rb") as f, np.load(io.BytesIO(f.read())) as arrays:
        return {name: arrays[name] for name in arrays.files}
