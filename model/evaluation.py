"""Evaluation library behind evaluate.py: predictions, metrics, report, duplicate lookup, submission.

Predictions are kept as each product's top-k classes and probabilities only: the full [N, K]
matrix of the real val split (~350k x 5,270) would not fit in memory.
"""

from __future__ import annotations

import collections
import csv
import dataclasses
import json
import io
import os
import time

import numpy as np
import tensorflow as tf

import record_schema
from model import cli, data_folder, visuals
from model import labels as labels_lib
from model import model_dir as model_dir_lib

TOP_K = 5
FREQUENCY_BINS = (0, 10, 100, 1_000, 10_000, None)  # training images per class: [lo, hi)


# ---------------------------------------------------------------------------------------------
# Model and predictions


def load_model(model_dir: str):
    """model.keras plus the train config (image size, model config) that train.py wrote beside it."""
    import keras

    from model import multi_image  # noqa: F401  (registers the custom layers for deserialisation)

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


# ---------------------------------------------------------------------------------------------
# Metrics


def _accuracy(hits: np.ndarray) -> float:
    return float(hits.mean()) if len(hits) else 0.0


def compute_metrics(true_classes, top_classes, num_images, labels: labels_lib.Labels,
                    train_class_counts=None, confused_pairs: int = 20) -> dict:
    """Product-level accuracy and its breakdowns.

    true_classes [N] class indices; top_classes [N, k] best first; num_images [N] real images per
    product; train_class_counts [K] training images per class (for the accuracy-by-frequency bins).
    """
    true_classes = np.asarray(true_classes, np.int64)
    top_classes = np.asarray(top_classes, np.int64).reshape(len(true_classes), -1)
    num_images = np.asarray(num_images, np.int64)
    predicted = top_classes[:, 0] if len(true_classes) else np.zeros([0], np.int64)
    top1 = predicted == true_classes
    top5 = (top_classes[:, :5] == true_classes[:, None]).any(axis=1)

    metrics = {"products": int(len(true_classes)), "top1": _accuracy(top1), "top5": _accuracy(top5)}

    metrics["by_image_count"] = {
        str(n): {"products": int((num_images == n).sum()), "top1": _accuracy(top1[num_images == n]),
                 "top5": _accuracy(top5[num_images == n])}
        for n in sorted(set(num_images.tolist()))
    }

    # The category tree: level1 and level2 are right when the predicted category sits under the
    # true one's node; level3 (the leaf name) when the whole path matches.
    l1 = np.asarray(labels.level1_index)
    l2 = np.asarray(labels.level2_index)
    paths = list(zip(labels.level1, labels.level2, labels.level3))
    path_index = {p: i for i, p in enumerate(sorted(set(paths)))}
    path = np.array([path_index[p] for p in paths], np.int64)
    metrics["by_level"] = {
        "level1": _accuracy(l1[predicted] == l1[true_classes]),
        "level2": _accuracy(l2[predicted] == l2[true_classes]),
        "level3": _accuracy(path[predicted] == path[true_classes]),
        "category": metrics["top1"],
    }

    pairs = collections.Counter(zip(true_classes[~top1].tolist(), predicted[~top1].tolist()))
    metrics["most_confused"] = [
        {"true": int(labels.category_ids[t]), "predicted": int(labels.category_ids[p]), "count": c,
         "true_name": labels.level3[t], "predicted_name": labels.level3[p]}
        for (t, p), c in pairs.most_common(confused_pairs)
    ]

    per_category = {}
    for c in np.unique(true_classes):
        hits = top1[true_classes == c]
        per_category[str(int(labels.category_ids[c]))] = {"products": int(len(hits)), "top1": _accuracy(hits)}
    metrics["by_category"] = per_category

    if train_class_counts is not None:
        counts = np.asarray(train_class_counts)[true_classes]
        bins = []
        for lo, hi in zip(FREQUENCY_BINS[:-1], FREQUENCY_BINS[1:]):
            inside = (counts >= lo) & ((counts < hi) if hi is not None else True)
            if inside.any():
                label = f"{lo}-{hi - 1}" if hi is not None else f">={lo}"
                bins.append({"train_images": label, "products": int(inside.sum()), "top1": _accuracy(top1[inside])})
        metrics["by_class_frequency"] = bins
    return metrics


# ---------------------------------------------------------------------------------------------
# Duplicate-image lookup


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


# ---------------------------------------------------------------------------------------------
# Submission


def most_frequent_category(labels: labels_lib.Labels, train_class_counts=None) -> int:
    """The fallback prediction for products the model never saw: the commonest training category.

    From train_image_digests.npz counts (training images) when present, else the first class.
    """
    if train_class_counts is not None and np.sum(train_class_counts) > 0:
        return int(labels.category_ids[int(np.argmax(train_class_counts))])
    return int(labels.category_ids[0])


def write_submission(path: str, product_ids, category_ids, rejected: list[dict], fallback: int,
                     all_product_ids=None) -> dict:
    """`_id,category_id`, one row per product: predicted ones, then rejected ones with `fallback`,
    then (given the split's `all_product_ids`) converted ones that could not be read, also with it.

    A rejected entry without an _id (a corrupt document) cannot have a row; a rejected _id that
    was also converted (a duplicate _id) keeps its prediction. Both are counted in the summary.
    """
    rows = dict(zip((int(p) for p in product_ids), (int(c) for c in category_ids)))
    predicted = len(rows)
    unreadable = 0
    for pid in (all_product_ids if all_product_ids is not None else ()):
        if int(pid) not in rows:
            rows[int(pid)] = fallback
            unreadable += 1
    no_id = 0
    for entry in rejected:
        pid = entry.get("_id")
        if pid is None:
            no_id += 1
        elif int(pid) not in rows:
            rows[int(pid)] = fallback
    with tf.io.gfile.GFile(path, "w") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(["_id", "category_id"])
        writer.writerows(rows.items())
    return {"rows": len(rows), "predicted": predicted, "unreadable_with_fallback": unreadable,
            "rejected_with_fallback": len(rows) - predicted - unreadable, "rejected_without_id": no_id,
            "fallback_category_id": fallback}


# ---------------------------------------------------------------------------------------------
# The evaluation run


def evaluate(*, data_dir: str, model_dir: str, split: str, output_dir: str | None = None,
             batch_size: int = 64, flip_tta: bool = False, dup_lookup: bool = False,
             train_data_dir: str | None = None, skip_corrupt_records: bool = False, log=print) -> dict:
    """Predicts one split of a beam_convert folder; writes metrics.json + report.png (labelled
    splits) and submission.csv (test). Returns the summary that is written to metrics.json.

    The output is written into a temporary folder beside output_dir and moved into place at the
    end: a failed evaluation leaves no half-written folder, and an earlier complete one unchanged.
    """
    output_dir = output_dir or model_dir_lib.eval_dir(model_dir, split)
    # A sibling whose name does not extend output_dir's: object stores list by prefix.
    parent, name = os.path.split(output_dir.rstrip("/"))
    partial = os.path.join(parent, f".partial-{name}")
    if tf.io.gfile.exists(partial):
        tf.io.gfile.rmtree(partial)
    tf.io.gfile.makedirs(partial)
    try:
        summary = _evaluate_into(partial, data_dir=data_dir, model_dir=model_dir, split=split,
                                 batch_size=batch_size, flip_tta=flip_tta, dup_lookup=dup_lookup,
                                 train_data_dir=train_data_dir, skip_corrupt_records=skip_corrupt_records, log=log)
    except BaseException:
        tf.io.gfile.rmtree(partial)
        if tf.io.gfile.exists(output_dir):
            log(f"{output_dir} still holds the earlier evaluation (its metrics.json says which model and data).")
        raise
    _move_into_place(partial, output_dir)
    log(f"Wrote {output_dir}")
    return summary


def _move_into_place(partial: str, output_dir: str) -> None:
    """Replaces output_dir's files by partial's, metrics.json last (its presence means complete).

    File by file, not one directory rename: object stores (gs://) have no directory rename."""
    new = tf.io.gfile.listdir(partial)
    if tf.io.gfile.exists(output_dir):
        old = tf.io.gfile.listdir(output_dir)
        # The old metrics.json first, so that from here the folder never looks complete until done.
        for name in sorted(old, key=lambda n: n != model_dir_lib.METRICS_FILE):
            path = os.path.join(output_dir, name)
            if tf.io.gfile.isdir(path):
                tf.io.gfile.rmtree(path)
            elif name not in new or name == model_dir_lib.METRICS_FILE:
                tf.io.gfile.remove(path)
    tf.io.gfile.makedirs(output_dir)
    for name in sorted(new, key=lambda n: n == model_dir_lib.METRICS_FILE):
        tf.io.gfile.rename(os.path.join(partial, name), os.path.join(output_dir, name), overwrite=True)
    tf.io.gfile.rmtree(partial)


def _evaluate_into(output_dir: str, *, data_dir: str, model_dir: str, split: str, batch_size: int,
                   flip_tta: bool, dup_lookup: bool, train_data_dir: str | None, skip_corrupt_records: bool,
                   log) -> dict:
    from model import shards, training

    model, config = load_model(model_dir)
    # Class index <-> category id as the model learnt it (a test folder has its own labels.csv).
    labels = labels_lib.read_labels(os.path.join(model_dir, record_schema.LABELS_FILE))
    train_data_dir = train_data_dir or config["train"]["data_dir"]
    digests_path = os.path.join(train_data_dir, record_schema.IMAGE_DIGESTS_FILE)
    table = DigestTable(digests_path) if tf.io.gfile.exists(digests_path) else None
    if dup_lookup and table is None:
        raise cli.UserError(f"--dup_lookup needs {digests_path}")
    class_counts = table.class_counts(labels) if table is not None else None

    check = shards.check_split(data_dir, split, skip_corrupt_records=skip_corrupt_records, log=log)
    pattern = data_folder.split_pattern(data_dir, split)
    trained = training.config_from_json(config["train"])
    dataset = training.split_dataset(dataclasses.replace(trained, data_dir=data_dir), split, training=False,
                                     batch_size=batch_size, **({"skip_corrupt_records": True} if check.damaged else {}))
    log(f"Evaluating {model_dir} on {pattern}{' with flip TTA' if flip_tta else ''}")
    predictions = predict_top_k(model, dataset, flip_tta=flip_tta, total=check.records, log=log)
    top_classes = predictions["top_classes"]
    if len(top_classes) != check.records:  # the shards changed while they were read
        raise cli.UserError(f"{data_dir}: read {len(top_classes)} {split} products, the check counted {check.records}")

    summary = {"split": split, "data_dir": data_dir, "model_dir": model_dir, "flip_tta": flip_tta,
               "dup_lookup": dup_lookup, "products": int(len(top_classes)),
               "skipped_records": check.unreadable, "damaged_files": sorted(check.damaged)}
    if check.damaged:
        log(f"{check.unreadable} of {check.expected} {split} products were unreadable in "
            f"{len(check.damaged)} damaged file(s) and are left out")
    if dup_lookup:
        digests = read_record_digests(pattern, skip_corrupt_records=bool(check.damaged))
        top_classes, overridden = apply_duplicate_lookup(predictions, digests, table, labels)
        summary["dup_lookup_overridden"] = overridden

    labelled = len(predictions["label"]) and (predictions["label"] >= 0).all()
    if labelled:
        data_labels = labels_lib.read_labels(data_dir)
        if not np.array_equal(data_labels.category_ids, labels.category_ids):
            raise cli.UserError(f"{data_dir}/labels.csv differs from the model's classes ({model_dir}/labels.csv)")
        metrics = compute_metrics(predictions["label"], top_classes, predictions["num_images"], labels, class_counts)
        if dup_lookup:
            plain = compute_metrics(predictions["label"], predictions["top_classes"], predictions["num_images"], labels)
            metrics["dup_lookup"] = {"overridden": summary["dup_lookup_overridden"],
                                     "top1_without": plain["top1"], "top5_without": plain["top5"],
                                     "top1_gain": metrics["top1"] - plain["top1"],
                                     "top5_gain": metrics["top5"] - plain["top5"]}
        summary.update(metrics)
        visuals.write_report(metrics, os.path.join(output_dir, model_dir_lib.REPORT_FILE), model_name=model.name,
                             fusion=config["model"]["fusion"], split=split)
        log(f"{split}: top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  ({metrics['products']} products); "
            f"by image count: " + ", ".join(f"{n}: {m['top1']:.3f}" for n, m in metrics["by_image_count"].items()))
    if split == "test" or not labelled:
        fallback = most_frequent_category(labels, class_counts)
        submission = write_submission(
            os.path.join(output_dir, model_dir_lib.SUBMISSION_FILE), predictions["product_id"],
            labels.category_ids[top_classes[:, 0]] if len(top_classes) else [],
            data_folder.read_rejected(data_dir), fallback,
            all_product_ids=data_folder.read_product_ids(data_dir, split))
        summary["submission"] = submission
        log(f"submission.csv: {submission['rows']} rows ({submission['rejected_with_fallback']} rejected and "
            f"{submission['unreadable_with_fallback']} unreadable products given the most frequent training "
            f"category {fallback})")
    with tf.io.gfile.GFile(os.path.join(output_dir, model_dir_lib.METRICS_FILE), "w") as f:
        json.dump(summary, f, indent=1)
    return summary
