"""metrics.json's accuracy figures from true and predicted classes: top-1/top-5, by image count,
by level of the category tree, by training frequency of the true class, most confused pairs."""

from __future__ import annotations

import collections

import numpy as np

from model.input_pipeline.labels import Labels

FREQUENCY_BINS = (0, 10, 100, 1_000, 10_000, None)  # training images per class: [lo, hi)


def _accuracy(hits: np.ndarray) -> float:
    return float(hits.mean()) if len(hits) else 0.0


def compute_metrics(true_classes, top_classes, num_images, labels: Labels,
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
