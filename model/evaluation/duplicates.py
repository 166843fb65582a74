"""The duplicate-image lookup (--dup_lookup): pictures seen in training (train_image_digests.npz,
docs/FORMATS.md) bring their training categories, either per picture (image level, the default:
`image_matches`, `rest_mask`, `fuse_image_level`) or for the whole product (product level:
`apply_duplicate_lookup`). BUILD_NOTES.md, "Ensembles and image-level duplicates", compares them."""

from __future__ import annotations

import collections
import dataclasses
import io

import numpy as np
import tensorflow as tf

import record_schema
from model.input_pipeline.labels import Labels


def read_record_digests(file_pattern: str, *, max_images: int = record_schema.MAX_IMAGES,
                        skip_corrupt_records: bool = False) -> dict:
    """product_id -> image digests of its real images, read straight from the TFRecords (of
    max_images slots: the data folder's, data_folder.max_images).

    skip_corrupt_records: as in the input pipeline, a damaged record ends its file (the products
    after it are the ones the predictions left out too)."""
    spec = {k: v for k, v in record_schema.feature_spec(max_images).items() if k in ("product_id", "images", "mask")}
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

    def class_counts(self, labels: Labels) -> np.ndarray:
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
                           labels: Labels) -> tuple[np.ndarray, int]:
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


# ---------------------------------------------------------------------------------------------
# Image level: a matched picture's prediction replaced by its training labels, fused with the
# model's prediction from the product's other pictures (the default of --dup_lookup; the
# product-level override above is --dup_lookup_level=product).


@dataclasses.dataclass(frozen=True)
class ImageMatches:
    """One product's pictures that are training pictures."""
    slots: tuple[int, ...]  # their slots (real images come first in a record, so slot = picture index)
    distribution: dict  # class index -> summed over those slots, the share of that picture's training labels


def image_matches(product_digests: dict, table: DigestTable, labels: Labels) -> dict:
    """product_id -> ImageMatches, for the products with at least one picture seen in training
    under a category the model knows. A picture seen under two categories (3 and 1 times) gives
    them 0.75 and 0.25."""
    index = labels.class_of_category()
    matches = {}
    for pid, digests in product_digests.items():
        slots, distribution = [], collections.Counter()
        for slot, digest in enumerate(digests):
            known = {index[c]: n for c, n in table.votes([digest]).items() if c in index}
            if known:
                slots.append(slot)
                total = sum(known.values())
                for c, n in known.items():
                    distribution[c] += n / total
        if slots:
            matches[pid] = ImageMatches(tuple(slots), dict(distribution))
    return matches


def rest_mask(product_ids, mask: np.ndarray, matches: dict) -> tuple[np.ndarray, np.ndarray]:
    """The batch's mask with every matched picture's slot set to 0, and the rows that have a match."""
    rest = np.array(mask, np.float32, copy=True)
    rows = []
    for row, pid in enumerate(np.asarray(product_ids).tolist()):
        found = matches.get(pid)
        if found is not None:
            rest[row, list(found.slots)] = 0.0
            rows.append(row)
    return rest, np.array(rows, np.int64)


TIE_BREAK = 1e-6  # share of the model's whole-product prediction added to the fused one: it orders ties


def fuse_image_level(found: list, rest_probabilities: np.ndarray, rest_images: np.ndarray,
                     model_probabilities: np.ndarray) -> np.ndarray:
    """Each product's probabilities as the mean over its pictures, where a matched picture counts
    as its training label distribution and the other pictures together count as the model's
    prediction from them alone (weighted by how many they are):

        p = (sum over matched pictures of their label distribution + n_rest * p_rest) / (n_matched + n_rest)

    found: ImageMatches per row; rest_probabilities [R, K] (any values where rest_images is 0);
    rest_images [R] real pictures left unmatched. A product whose every picture matched gets its
    label distribution alone: the product-level override's answer. model_probabilities [R, K],
    the model's prediction from all the product's pictures, breaks ties (a picture seen in
    training once under each of two categories), as the product level's model ranking does:
    TIE_BREAK of it is added, and the rows renormalised.
    """
    model_probabilities = np.asarray(model_probabilities, np.float64)
    fused = np.zeros([len(found), model_probabilities.shape[-1]], np.float64)
    for row, match in enumerate(found):
        for c, share in match.distribution.items():
            fused[row, c] += share
        n_rest = float(rest_images[row])
        if n_rest > 0:
            fused[row] += n_rest * np.asarray(rest_probabilities[row], np.float64)
        fused[row] /= len(match.slots) + n_rest
    fused += TIE_BREAK * model_probabilities
    return (fused / fused.sum(axis=-1, keepdims=True)).astype(np.float32)
