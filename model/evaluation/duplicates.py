"""The duplicate-image lookup (--dup_lookup): a product whose picture was seen in training is
given that picture's training categories (train_image_digests.npz, docs/FORMATS.md)."""

from __future__ import annotations

import collections
import io

import numpy as np
import tensorflow as tf

import record_schema
from model.input_pipeline import labels as labels_lib


def read_record_digests(file_pattern: str, *, skip_corrupt_records: bool = False) -> dict:
    """product_id -> image digests of its real images, read straight from the TFRecords.

    skip_corrupt_records: as in the input pipeline, a damaged record ends its file (the products
    after it are the ones the predictions left out too)."""
    spec = {k: v for k, v in record_schema.feature_spec().items() if k in ("product_id", "images", "mask")}
    files = sorted(tf.io.gfile.glob(file_pattern))

    def read(path):
        records = tf.data.TFRecordDataset(path)
        return records.ignore_errors() if skip_corrupt_records else records

    ds = tf.data.Dataset.from_tensor_slices(files).interleave(read, cycle_length=1)
    ds = ds.batch(256).map(lambda s: tf.io.parse_example(s, spec))
    digests = {}
    for batch in ds.as_numpy_iterator():
        for pid, images, mask in zip(batch["product_id"][:, 0], batch["images"], batch["mask"]):
            digests[int(pid)] = [record_schema.image_digest(img) for img, m in zip(images, mask) if m]
    return digests


class DigestTable:
    """train_image_digests.npz: image digest -> (category_id, count) rows, searched in sorted arrays."""

    def __init__(self, path: str):
        with tf.io.gfile.GFile(path, "rb") as f, np.load(io.BytesIO(f.read())) as table:
            order = np.argsort(table["digest"], kind="stable")
            self.digest = table["digest"][order]
            self.category_id = table["category_id"][order]
            self.count = table["count"][order]

    def class_counts(self, labels: labels_lib.Labels) -> np.ndarray:
        """Training images per class index."""
        index = labels.class_of_category()
        counts = np.zeros(labels.num_classes, np.int64)
        for c, n in zip(self.category_id.tolist(), self.count.tolist()):
            if c in index:
                counts[index[c]] += n
        return counts

    def votes(self, digests) -> collections.Counter:
        """category_id -> training images with any of these digests."""
        votes = collections.Counter()
        q = np.asarray(digests, np.int64)
        lo, hi = np.searchsorted(self.digest, q, "left"), np.searchsorted(self.digest, q, "right")
        for a, b in zip(lo, hi):
            for c, n in zip(self.category_id[a:b].tolist(), self.count[a:b].tolist()):
                votes[c] += n
        return votes


def apply_duplicate_lookup(predictions: dict, product_digests: dict, table: DigestTable,
                           labels: labels_lib.Labels) -> tuple[np.ndarray, int]:
    """New top-k classes where a product's image was seen in training: the categories of those
    training images, most votes first (ties broken by the model's ranking), then the model's own.

    Returns (top_classes [N, k], number of products overridden).
    """
    index = labels.class_of_category()
    top = predictions["top_classes"].copy()
    k = top.shape[1]
    overridden = 0
    for row, pid in enumerate(predictions["product_id"].tolist()):
        votes = table.votes(product_digests.get(pid, []))
        known = {index[c]: n for c, n in votes.items() if c in index}
        if not known:
            continue
        model_rank = {c: r for r, c in enumerate(top[row].tolist())}
        dup = sorted(known, key=lambda c: (-known[c], model_rank.get(c, k), c))
        merged = dup + [c for c in top[row].tolist() if c not in known]
        top[row] = merged[:k]
        overridden += 1
    return top, overridden
