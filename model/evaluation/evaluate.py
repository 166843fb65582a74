"""The evaluation run behind evaluate.py: predictions of one model or an ensemble over one split,
then metrics.json and report.png (labelled splits) or submission.csv (test), and top_k.npz when
asked, moved into place only when complete."""

from __future__ import annotations

import json
import os

import numpy as np
import tensorflow as tf

import record_schema
from model import atomic, signals
from model import model_dir as model_dir_lib
from model.config import ImageSpec
from model.errors import UserError
from model.evaluation import duplicates, ensemble, metrics as metrics_lib, predict, report, submission as submission_lib
from model.evaluation import top_k_file
from model.input_pipeline import data_folder, shards
from model.input_pipeline import labels as labels_lib


DUP_LOOKUP_LEVELS = ("image", "product")  # the first is the default (BUILD_NOTES.md measures both)


def evaluate(*, data_dir: str, model_dir, split: str, output_dir: str | None = None,
             batch_size: int = 64, flip_tta: bool = False, dup_lookup: bool = False,
             dup_lookup_level: str = DUP_LOOKUP_LEVELS[0], train_data_dir: str | None = None,
             skip_corrupt_records: bool = False, checkpoint: str = "final", ensemble_weights: str | None = None,
             ensemble_mean: str = "arithmetic", save_top_k: int = 0, log=print) -> dict:
    """Predicts one split of a beam_convert folder; writes metrics.json + report.png (labelled
    splits) and submission.csv (test), and top_k.npz with save_top_k > 0. Returns the summary
    that is written to metrics.json.

    model_dir: one folder, or several ("A,B" or a list): an ensemble averaging their class
    probabilities (ensemble.combine: ensemble_mean, ensemble_weights "w1,w2"). checkpoint: final
    or best, one for all or one per model ("final,best").

    The output is written into a temporary folder beside output_dir and moved into place at the
    end: a failed evaluation leaves no half-written folder, and an earlier complete one unchanged.
    """
    model_dirs = ensemble.split_list(model_dir) if isinstance(model_dir, str) else list(model_dir)
    if not model_dirs:
        raise UserError("--model_dir names no folder")
    checkpoints = ensemble.member_checkpoints(checkpoint, model_dirs)
    weights = ensemble.member_weights(ensemble_weights, model_dirs)
    if ensemble_mean not in ensemble.MEANS:
        raise UserError(f"--ensemble_mean must be one of {', '.join(ensemble.MEANS)}, got {ensemble_mean!r}")
    if dup_lookup_level not in DUP_LOOKUP_LEVELS:
        raise UserError(f"--dup_lookup_level must be one of {', '.join(DUP_LOOKUP_LEVELS)}, got {dup_lookup_level!r}")
    output_dir = output_dir or default_output_dir(model_dirs, checkpoints, split)
    try:
        with atomic.written_whole(output_dir, last=model_dir_lib.METRICS_FILE) as partial:
            tf.io.gfile.makedirs(partial)
            summary = _evaluate_into(partial, data_dir=data_dir, model_dirs=model_dirs, checkpoints=checkpoints,
                                     weights=weights, mean=ensemble_mean, split=split, batch_size=batch_size,
                                     flip_tta=flip_tta, dup_lookup=dup_lookup, dup_lookup_level=dup_lookup_level,
                                     train_data_dir=train_data_dir, skip_corrupt_records=skip_corrupt_records,
                                     save_top_k=save_top_k, log=log)
            signals.raise_if_requested()  # the last safe point: from here the folder is moved into place
    except BaseException:
        if tf.io.gfile.exists(output_dir):
            log(f"{output_dir} still holds the earlier evaluation (its metrics.json says which model and data).")
        raise
    log(f"Wrote {output_dir}")
    return summary


def default_output_dir(model_dirs: list[str], checkpoints: list[str], split: str) -> str:
    """MODEL_DIR/eval_SPLIT; eval_SPLIT_best for best.keras; the first model's eval_SPLIT_ensemble
    for an ensemble (so that neither overwrites the final model's own evaluation)."""
    folder = model_dir_lib.eval_dir(model_dirs[0], split)
    if len(model_dirs) > 1:
        return folder + "_ensemble"
    return folder + ("_best" if checkpoints[0] == "best" else "")


def _load_members(model_dirs, checkpoints, weights) -> tuple[list, labels_lib.Labels]:
    members, label_sets = [], []
    for model_dir, checkpoint, weight in zip(model_dirs, checkpoints, weights):
        model, config = predict.load_model(model_dir, checkpoint)
        members.append(predict.Member(model_dir, checkpoint, model, config, float(weight)))
        # Class index <-> category id as the model learnt it (a test folder has its own labels.csv).
        label_sets.append(labels_lib.read_labels(os.path.join(model_dir, record_schema.LABELS_FILE)))
    ensemble.check_same_classes(model_dirs, label_sets)
    return members, label_sets[0]


def _member_datasets(members, data_dir: str, split: str, batch_size: int, skip: bool) -> list:
    """One evaluation dataset per member; members decoding at the same size share one."""
    by_size = {}
    for member in members:
        key = (member.image_size, member.crop_size)
        if key not in by_size:
            by_size[key] = data_folder.split_dataset(data_dir, split, ImageSpec(*key), training=False,
                                                     batch_size=batch_size, skip_corrupt_records=skip)
    return [by_size[(m.image_size, m.crop_size)] for m in members]


def _evaluate_into(output_dir: str, *, data_dir: str, model_dirs: list[str], checkpoints: list[str], weights,
                   mean: str, split: str, batch_size: int, flip_tta: bool, dup_lookup: bool, dup_lookup_level: str,
                   train_data_dir: str | None, skip_corrupt_records: bool, save_top_k: int, log) -> dict:
    members, labels = _load_members(model_dirs, checkpoints, weights)
    model_dir = ",".join(model_dirs)
    train_data_dir = train_data_dir or members[0].config["train"]["data_dir"]
    digests_path = os.path.join(train_data_dir, record_schema.IMAGE_DIGESTS_FILE)
    table = duplicates.DigestTable(digests_path) if tf.io.gfile.exists(digests_path) else None
    if dup_lookup and table is None:
        raise UserError(f"--dup_lookup needs {digests_path}")
    class_counts = table.class_counts(labels) if table is not None else None

    if split != "test":
        _check_same_classes(data_dir, model_dirs[0], labels)  # before a long prediction, not after
    check = shards.check_split(data_dir, split, skip_corrupt_records=skip_corrupt_records, log=log)
    pattern = data_folder.split_pattern(data_dir, split)
    datasets = _member_datasets(members, data_dir, split, batch_size, bool(check.damaged))
    digests = matches = None
    if dup_lookup:
        digests = duplicates.read_record_digests(pattern, skip_corrupt_records=bool(check.damaged))
        matches = duplicates.image_matches(digests, table, labels)
    what = f"the ensemble of {len(members)} ({mean} mean) " if len(members) > 1 else ""
    log(f"Evaluating {what}{model_dir}{' (' + ','.join(checkpoints) + ')' if 'best' in checkpoints else ''} "
        f"on {pattern}{' with flip TTA' if flip_tta else ''}")
    k = max(predict.TOP_K, save_top_k)
    predictions = predict.predict_top_k(members, datasets, k=k, flip_tta=flip_tta, mean=mean,
                                        image_matches=matches, total=check.records, log=log)
    model_top = predictions["top_classes"]
    if len(model_top) != check.records:  # the shards changed while they were read
        raise UserError(f"{data_dir}: read {len(model_top)} {split} products, the check counted {check.records}")

    summary = {"split": split, "data_dir": data_dir, "model_dir": model_dir, "checkpoint": ",".join(checkpoints),
               "flip_tta": flip_tta, "dup_lookup": dup_lookup, "products": int(len(model_top)),
               "skipped_records": check.unreadable, "damaged_files": sorted(check.damaged)}
    if len(members) > 1:
        summary["ensemble"] = {"mean": mean, "weights": [m.weight for m in members]}
    if check.damaged:
        log(f"{check.unreadable} of {check.expected} {split} products were unreadable in "
            f"{len(check.damaged)} damaged file(s) and are left out")
    top_classes = model_top
    if dup_lookup:
        product_top, overridden = duplicates.apply_duplicate_lookup(predictions, digests, table, labels)
        image_top, image_matched = predictions["image_top_classes"], int(predictions["image_matched"].sum())
        top_classes, changed = (image_top, image_matched) if dup_lookup_level == "image" else (product_top, overridden)
        summary["dup_lookup_level"] = dup_lookup_level
        summary["dup_lookup_overridden"] = changed
    if save_top_k:
        top_k_file.write_top_k(os.path.join(output_dir, top_k_file.FILE), product_id=predictions["product_id"],
                               label=predictions["label"], top_classes=model_top,
                               top_probabilities=predictions["top_probabilities"],
                               category_ids=labels.category_ids, k=save_top_k)
        summary["top_k_file"] = top_k_file.FILE

    labelled = len(predictions["label"]) and (predictions["label"] >= 0).all()
    summary["members"] = [{"model_dir": m.model_dir, "checkpoint": m.checkpoint, "weight": m.weight,
                           "image_size": m.image_size, "crop_size": m.crop_size, "fusion": m.fusion}
                          for m in members]
    if labelled:
        if split == "test":  # labelled after all: the other splits were compared before predicting
            _check_same_classes(data_dir, model_dirs[0], labels)
        true, num_images = predictions["label"], predictions["num_images"]
        metrics = metrics_lib.compute_metrics(true, top_classes, num_images, labels, class_counts)
        for entry, member_top in zip(summary["members"], predictions["member_top_classes"]):
            alone = metrics_lib.compute_metrics(true, member_top, num_images, labels)
            entry.update(top1=alone["top1"], top5=alone["top5"], by_image_count=alone["by_image_count"])
        if dup_lookup:
            plain = metrics_lib.compute_metrics(true, model_top, num_images, labels)
            product = metrics_lib.compute_metrics(true, product_top, num_images, labels)
            image = metrics_lib.compute_metrics(true, image_top, num_images, labels)
            metrics["dup_lookup"] = {"level": dup_lookup_level, "overridden": summary["dup_lookup_overridden"],
                                     "top1_without": plain["top1"], "top5_without": plain["top5"],
                                     "top1_gain": metrics["top1"] - plain["top1"],
                                     "top5_gain": metrics["top5"] - plain["top5"],
                                     "product_level": {"overridden": overridden, "top1": product["top1"],
                                                       "top5": product["top5"]},
                                     "image_level": {"matched": image_matched, "top1": image["top1"],
                                                     "top5": image["top5"]}}
        summary.update(metrics)
        name = members[0].model.name if len(members) == 1 else f"ensemble of {len(members)}"
        report.write_report(metrics, os.path.join(output_dir, model_dir_lib.REPORT_FILE), model_name=name,
                            fusion="+".join(m.fusion for m in members), split=split)
        log(f"{split}: top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  ({metrics['products']} products); "
            f"by image count: " + ", ".join(f"{n}: {m['top1']:.3f}" for n, m in metrics["by_image_count"].items()))
        if len(members) > 1:
            for entry in summary["members"]:
                log(f"  member {entry['model_dir']} ({entry['checkpoint']}): top-1 {entry['top1']:.4f}  "
                    f"top-5 {entry['top5']:.4f}")
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
