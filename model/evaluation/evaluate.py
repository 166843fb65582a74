"""The evaluation run behind evaluate.py: predictions over one split, then metrics.json and
report.png (labelled splits) or submission.csv (test), moved into place only when complete."""

from __future__ import annotations

import dataclasses
import json
import os

import numpy as np
import tensorflow as tf

import record_schema
from model import atomic
from model import model_dir as model_dir_lib
from model.config import config_from_json
from model.errors import UserError
from model.evaluation import duplicates, metrics as metrics_lib, predict, report, submission as submission_lib
from model.input_pipeline import data_folder, shards
from model.input_pipeline import labels as labels_lib


def evaluate(*, data_dir: str, model_dir: str, split: str, output_dir: str | None = None,
             batch_size: int = 64, flip_tta: bool = False, dup_lookup: bool = False,
             train_data_dir: str | None = None, skip_corrupt_records: bool = False, log=print) -> dict:
    """Predicts one split of a beam_convert folder; writes metrics.json + report.png (labelled
    splits) and submission.csv (test). Returns the summary that is written to metrics.json.

    The output is written into a temporary folder beside output_dir and moved into place at the
    end: a failed evaluation leaves no half-written folder, and an earlier complete one unchanged.
    """
    output_dir = output_dir or model_dir_lib.eval_dir(model_dir, split)
    try:
        with atomic.written_whole(output_dir, last=model_dir_lib.METRICS_FILE) as partial:
            tf.io.gfile.makedirs(partial)
            summary = _evaluate_into(partial, data_dir=data_dir, model_dir=model_dir, split=split,
                                     batch_size=batch_size, flip_tta=flip_tta, dup_lookup=dup_lookup,
                                     train_data_dir=train_data_dir, skip_corrupt_records=skip_corrupt_records,
                                     log=log)
    except BaseException:
        if tf.io.gfile.exists(output_dir):
            log(f"{output_dir} still holds the earlier evaluation (its metrics.json says which model and data).")
        raise
    log(f"Wrote {output_dir}")
    return summary


def _evaluate_into(output_dir: str, *, data_dir: str, model_dir: str, split: str, batch_size: int,
                   flip_tta: bool, dup_lookup: bool, train_data_dir: str | None, skip_corrupt_records: bool,
                   log) -> dict:
    model, config = predict.load_model(model_dir)
    # Class index <-> category id as the model learnt it (a test folder has its own labels.csv).
    labels = labels_lib.read_labels(os.path.join(model_dir, record_schema.LABELS_FILE))
    train_data_dir = train_data_dir or config["train"]["data_dir"]
    digests_path = os.path.join(train_data_dir, record_schema.IMAGE_DIGESTS_FILE)
    table = duplicates.DigestTable(digests_path) if tf.io.gfile.exists(digests_path) else None
    if dup_lookup and table is None:
        raise UserError(f"--dup_lookup needs {digests_path}")
    class_counts = table.class_counts(labels) if table is not None else None

    if split != "test":
        _check_same_classes(data_dir, model_dir, labels)  # before a long prediction, not after
    check = shards.check_split(data_dir, split, skip_corrupt_records=skip_corrupt_records, log=log)
    pattern = data_folder.split_pattern(data_dir, split)
    trained = config_from_json(config["train"])
    dataset = data_folder.split_dataset(dataclasses.replace(trained, data_dir=data_dir), split, training=False,
                                        batch_size=batch_size, **({"skip_corrupt_records": True} if check.damaged else {}))
    log(f"Evaluating {model_dir} on {pattern}{' with flip TTA' if flip_tta else ''}")
    predictions = predict.predict_top_k(model, dataset, flip_tta=flip_tta, total=check.records, log=log)
    top_classes = predictions["top_classes"]
    if len(top_classes) != check.records:  # the shards changed while they were read
        raise UserError(f"{data_dir}: read {len(top_classes)} {split} products, the check counted {check.records}")

    summary = {"split": split, "data_dir": data_dir, "model_dir": model_dir, "flip_tta": flip_tta,
               "dup_lookup": dup_lookup, "products": int(len(top_classes)),
               "skipped_records": check.unreadable, "damaged_files": sorted(check.damaged)}
    if check.damaged:
        log(f"{check.unreadable} of {check.expected} {split} products were unreadable in "
            f"{len(check.damaged)} damaged file(s) and are left out")
    if dup_lookup:
        digests = duplicates.read_record_digests(pattern, skip_corrupt_records=bool(check.damaged))
        top_classes, overridden = duplicates.apply_duplicate_lookup(predictions, digests, table, labels)
        summary["dup_lookup_overridden"] = overridden

    labelled = len(predictions["label"]) and (predictions["label"] >= 0).all()
    if labelled:
        if split == "test":  # labelled after all: the other splits were compared before predicting
            _check_same_classes(data_dir, model_dir, labels)
        metrics = metrics_lib.compute_metrics(predictions["label"], top_classes, predictions["num_images"], labels, class_counts)
        if dup_lookup:
            plain = metrics_lib.compute_metrics(predictions["label"], predictions["top_classes"], predictions["num_images"], labels)
            metrics["dup_lookup"] = {"overridden": summary["dup_lookup_overridden"],
                                     "top1_without": plain["top1"], "top5_without": plain["top5"],
                                     "top1_gain": metrics["top1"] - plain["top1"],
                                     "top5_gain": metrics["top5"] - plain["top5"]}
        summary.update(metrics)
        report.write_report(metrics, os.path.join(output_dir, model_dir_lib.REPORT_FILE), model_name=model.name,
                            fusion=config["model"]["fusion"], split=split)
        log(f"{split}: top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  ({metrics['products']} products); "
            f"by image count: " + ", ".join(f"{n}: {m['top1']:.3f}" for n, m in metrics["by_image_count"].items()))
    if split == "test" or not labelled:
        fallback = submission_lib.most_frequent_category(labels, class_counts)
        submission = submission_lib.write_submission(
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


def _check_same_classes(data_dir: str, model_dir: str, labels: labels_lib.Labels) -> None:
    if not np.array_equal(labels_lib.read_labels(data_dir).category_ids, labels.category_ids):
        raise UserError(f"{data_dir}/labels.csv differs from the model's classes ({model_dir}/labels.csv)")
