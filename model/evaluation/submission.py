"""submission.csv (`_id,category_id`): a row for every product of the input, rejected ones
included."""

from __future__ import annotations

import csv

import numpy as np
import tensorflow as tf

from model.input_pipeline.labels import Labels


def most_frequent_category(labels: Labels, train_class_counts=None) -> int:
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
