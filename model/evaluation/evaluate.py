"""The evaluation run behind evaluate.py: predictions of one model or an ensemble over one split,
then metrics.json and report.png (labelled splits) or submission.csv (test), and top_k.npz when
asked, moved into place only when complete."""

from __future__ import annotations

import contextlib
import dataclasses
import json
import os
from typing import Callable

import numpy as np
import tensorflow as tf

import record_schema
from model import atomic, signals
from model.model_dir import METRICS_FILE, EvalFolder, RunFolder
from model.config import DUP_LOOKUP_LEVELS, EvalConfig
from model.errors import UserError
from model.evaluation import duplicates, ensemble, metrics as metrics_lib, predict, report, submission as submission_lib
from model.evaluation import top_k_file
from model.input_pipeline import data_folder, shards
from model.input_pipeline.labels import Labels, read_labels


def evaluate(cfg: EvalConfig, log=print, *, trainer_of: Callable[[str], str | None] = lambda model_dir: None,
             hold_output: Callable = lambda output_dir, log: contextlib.nullcontext()) -> dict:
    """Predicts one split of a beam_convert folder; writes metrics.json + report.png (labelled
    splits) and submission.csv (test), and top_k.npz with cfg.save_top_k > 0. Returns the summary
    that is written to metrics.json.

    cfg.model_dir: one folder, or several ("A,B" or a list): an ensemble averaging their class
    probabilities (ensemble.combine: ensemble_mean, ensemble_weights "w1,w2"). checkpoint: final
    or best, one for all or one per model ("final,best").

    The output is written into a temporary folder beside output_dir and moved into place at the
    end: a failed evaluation leaves no half-written folder, and an earlier complete one unchanged.
    The run locks come from the command (model/commands/evaluate.py passes model/training/run_lock's:
    training and evaluation are peers): trainer_of(model_dir) describes the live trainer of a
    member's folder, or None; hold_output(output_dir, log) holds the output folder against another
    evaluation while it is written.
    """
    model_dirs, checkpoints, weights = _members_asked(cfg)
    _say_still_training(model_dirs, checkpoints, trainer_of, log)
    output_dir = cfg.output_dir or default_output_dir(model_dirs, checkpoints, cfg.split)
    try:
        with (hold_output(output_dir, lambda text, **_: log(text)),
              atomic.written_whole(output_dir, last=METRICS_FILE) as partial):
            tf.io.gfile.makedirs(partial)
            summary = _evaluate_into(_Run(cfg, partial, log), model_dirs, checkpoints, weights)
            signals.raise_if_requested()  # the last safe point: from here the folder is moved into place
    except BaseException:
        if tf.io.gfile.exists(output_dir):
            log(f"{output_dir} still holds the earlier evaluation (its metrics.json says which model and data).")
        raise
    log(f"Wrote {output_dir}")
    return summary


def _members_asked(cfg: EvalConfig) -> tuple[list[str], list[str], np.ndarray]:
    """The members' folders, checkpoints and weights from the flags, each checked (one line when wrong)."""
    model_dirs = ensemble.split_list(cfg.model_dir) if isinstance(cfg.model_dir, str) else list(cfg.model_dir)
    if not model_dirs:
        raise UserError("--model_dir names no folder")
    checkpoints = ensemble.member_checkpoints(cfg.checkpoint, model_dirs)
    ensemble.check_distinct(model_dirs, checkpoints)
    weights = ensemble.member_weights(cfg.ensemble_weights, model_dirs)
    if cfg.ensemble_mean not in ensemble.MEANS:
        raise UserError(f"--ensemble_mean must be one of {', '.join(ensemble.MEANS)}, got {cfg.ensemble_mean!r}")
    if cfg.dup_lookup_level not in DUP_LOOKUP_LEVELS:
        raise UserError(f"--dup_lookup_level must be one of {', '.join(DUP_LOOKUP_LEVELS)}, "
                        f"got {cfg.dup_lookup_level!r}")
    return model_dirs, checkpoints, weights


def _say_still_training(model_dirs: list[str], checkpoints: list[str], trainer_of, log) -> None:
    """A member whose folder a live trainer holds: one line; an error when the model asked for is
    not written yet (model.keras comes at the end of training, best.keras with the first val epoch)."""
    for model_dir, checkpoint in zip(model_dirs, checkpoints):
        trainer = trainer_of(model_dir)
        if trainer is None:
            continue
        path = RunFolder(model_dir).model(checkpoint)
        if not tf.io.gfile.exists(path):
            hint = ("; evaluate the best epoch so far with --checkpoint=best" if checkpoint == "final" else "")
            raise UserError(f"{model_dir} is still being trained ({trainer}): {os.path.basename(path)} is not written "
                            f"yet; wait for the run to finish{hint}")
        log(f"{model_dir} is still being trained ({trainer}): evaluating its {os.path.basename(path)} as it is now")


def default_output_dir(model_dirs: list[str], checkpoints: list[str], split: str) -> str:
    """MODEL_DIR/eval_SPLIT; eval_SPLIT_best for best.keras; the first model's eval_SPLIT_ensemble
    for an ensemble (so that neither overwrites the final model's own evaluation)."""
    folder = RunFolder(model_dirs[0]).eval_dir(split)
    if len(model_dirs) > 1:
        return folder + "_ensemble"
    return folder + ("_best" if checkpoints[0] == "best" else "")


@dataclasses.dataclass
class _Run:
    """What the steps of one evaluation share; members and labels once they are loaded."""

    cfg: EvalConfig
    output_dir: str  # the temporary folder, moved into place when complete
    log: Callable[[str], None]
    members: list = dataclasses.field(default_factory=list)
    labels: Labels | None = None


def _evaluate_into(run: _Run, model_dirs: list[str], checkpoints: list[str], weights) -> dict:
    """The steps, in order: members, split check, prediction (with the duplicate lookup's digests),
    duplicate lookup, metrics and report, submission, metrics.json."""
    run.members, run.labels = _load_members(model_dirs, checkpoints, weights)
    if run.cfg.save_top_k > run.labels.num_classes:
        run.log(f"--save_top_k={run.cfg.save_top_k} is more than the model's {run.labels.num_classes} classes: "
                f"top_k.npz keeps all {run.labels.num_classes} a product")
    table = _digest_table(run)
    class_counts = table.class_counts(run.labels) if table is not None else None
    check, predictions, digests = _checked_predictions(run, table)
    summary = _summary(run, check, len(predictions["top_classes"]))
    top_classes, lookup = _duplicate_lookup(run, predictions, digests, table, summary)
    if run.cfg.save_top_k:
        _write_top_k(run, predictions)
        summary["top_k_file"] = top_k_file.FILE
    summary["members"] = [{"model_dir": m.model_dir, "checkpoint": m.checkpoint, "weight": m.weight,
                           "image_size": m.image.size, "crop_size": m.image.crop, "fusion": m.fusion}
                          for m in run.members]
    labelled = len(predictions["label"]) and (predictions["label"] >= 0).all()
    if labelled:
        _metrics_and_report(run, predictions, top_classes, lookup, class_counts, summary)
    if run.cfg.split == "test" or not labelled:
        summary["submission"] = _submission(run, predictions, top_classes, class_counts)
    with tf.io.gfile.GFile(EvalFolder(run.output_dir).metrics_file, "w") as f:
        json.dump(summary, f, indent=1)
    return summary


def _load_members(model_dirs, checkpoints, weights) -> tuple[list, Labels]:
    members, label_sets = [], []
    for model_dir, checkpoint, weight in zip(model_dirs, checkpoints, weights):
        model, config = predict.load_model(model_dir, checkpoint)
        members.append(predict.Member(model_dir, checkpoint, model, config, float(weight)))
        # Class index <-> category id as the model learnt it (a test folder has its own labels.csv).
        label_sets.append(read_labels(RunFolder(model_dir).labels_file))
    ensemble.check_same_classes(model_dirs, label_sets)
    return members, label_sets[0]


def _digest_table(run: _Run) -> duplicates.DigestTable | None:
    """The training data's image digests (the duplicate lookup, the class frequencies), if there."""
    train_data_dir = run.cfg.train_data_dir or run.members[0].config["train"]["data_dir"]
    digests_path = os.path.join(train_data_dir, record_schema.IMAGE_DIGESTS_FILE)
    table = duplicates.DigestTable(digests_path) if tf.io.gfile.exists(digests_path) else None
    if run.cfg.dup_lookup and table is None:
        raise UserError(f"--dup_lookup needs {digests_path}")
    return table


def _check_split(run: _Run) -> shards.SplitCheck:
    """The model's classes and the split's shards, before a long prediction rather than after."""
    cfg = run.cfg
    if cfg.split != "test":
        _check_same_classes(cfg.data_dir, run.members[0].model_dir, run.labels)
    data_slots = data_folder.max_images(cfg.data_dir)
    for member in run.members:
        predict.check_slot_count(member, cfg.data_dir, data_slots)
    return shards.check_split(cfg.data_dir, cfg.split, skip_corrupt_records=cfg.skip_corrupt_records,
                              verify_records=cfg.verify_records, log=run.log)


def _checked_predictions(run: _Run, table) -> tuple[shards.SplitCheck, dict, dict | None]:
    """The split checked, then predicted. Damage that kept its file's size passes the check by sizes
    and is met by the reader, whose message names no file: every record is then read, which names
    it (one line, or with --skip_corrupt_records a count of what is skipped), and the split read again."""
    check = _check_split(run)
    try:
        return (check,) + _predict(run, check, table)
    except tf.errors.DataLossError:
        if run.cfg.verify_records:
            raise  # every record was read by the check: the shards changed since
    cfg = run.cfg
    check = shards.check_split(cfg.data_dir, cfg.split, skip_corrupt_records=cfg.skip_corrupt_records,
                               verify_records=True, log=run.log)
    return (check,) + _predict(run, check, table)


def _predict(run: _Run, check: shards.SplitCheck, table) -> tuple[dict, dict | None]:
    """predict.predict_top_k over the split, and (--dup_lookup) the split's image digests."""
    cfg, members = run.cfg, run.members
    pattern = data_folder.split_pattern(cfg.data_dir, cfg.split)
    datasets = _member_datasets(members, cfg.data_dir, cfg.split, cfg.batch_size, bool(check.damaged))
    digests = matches = None
    if cfg.dup_lookup:
        digests = duplicates.read_record_digests(pattern, max_images=data_folder.max_images(cfg.data_dir),
                                                 skip_corrupt_records=bool(check.damaged))
        matches = duplicates.image_matches(digests, table, run.labels)
    checkpoints = [m.checkpoint for m in members]
    what = f"the ensemble of {len(members)} ({cfg.ensemble_mean} mean) " if len(members) > 1 else ""
    run.log(f"Evaluating {what}{_model_dir(run)}{' (' + ','.join(checkpoints) + ')' if 'best' in checkpoints else ''} "
            f"on {pattern}{' with flip TTA' if cfg.flip_tta else ''}")
    predictions = predict.predict_top_k(members, datasets, k=max(predict.TOP_K, cfg.save_top_k),
                                        flip_tta=cfg.flip_tta, mean=cfg.ensemble_mean, image_matches=matches,
                                        total=check.records, log=run.log)
    read = len(predictions["top_classes"])
    if read != check.records:  # the shards changed while they were read
        raise UserError(f"{cfg.data_dir}: read {read} {cfg.split} products, the check counted {check.records}")
    return predictions, digests


def _member_datasets(members, data_dir: str, split: str, batch_size: int, skip: bool) -> list:
    """One evaluation dataset per member; members reading their pictures alike share one."""
    by_image = {}
    for member in members:
        if member.image not in by_image:
            by_image[member.image] = data_folder.split_dataset(data_dir, split, member.image, training=False,
                                                                batch_size=batch_size, skip_corrupt_records=skip)
    return [by_image[m.image] for m in members]


def _model_dir(run: _Run) -> str:
    return ",".join(m.model_dir for m in run.members)


def _summary(run: _Run, check: shards.SplitCheck, products: int) -> dict:
    """metrics.json's first keys: what was evaluated, with what, and what could not be read."""
    cfg, members = run.cfg, run.members
    summary = {"split": cfg.split, "data_dir": cfg.data_dir, "model_dir": _model_dir(run),
               "checkpoint": ",".join(m.checkpoint for m in members), "flip_tta": cfg.flip_tta,
               "dup_lookup": cfg.dup_lookup, "products": products, "skipped_records": check.unreadable,
               "damaged_files": sorted(check.damaged)}
    if len(members) > 1:
        summary["ensemble"] = {"mean": cfg.ensemble_mean, "weights": [m.weight for m in members]}
    if check.damaged:
        run.log(f"{check.unreadable} of {check.expected} {cfg.split} products were unreadable in "
                f"{len(check.damaged)} damaged file(s) and are left out")
    return summary


def _duplicate_lookup(run: _Run, predictions: dict, digests, table, summary: dict):
    """The top classes scored: the model's, or (--dup_lookup) those after the lookup at the level
    asked; and the lookup's results at both levels ({level: (top classes, products changed)})."""
    if not run.cfg.dup_lookup:
        return predictions["top_classes"], None
    lookup = {"product": duplicates.apply_duplicate_lookup(predictions, digests, table, run.labels),
              "image": (predictions["image_top_classes"], int(predictions["image_matched"].sum()))}
    top_classes, changed = lookup[run.cfg.dup_lookup_level]
    summary["dup_lookup_level"] = run.cfg.dup_lookup_level
    summary["dup_lookup_overridden"] = changed
    return top_classes, lookup


def _write_top_k(run: _Run, predictions: dict) -> None:
    top_k_file.write_top_k(os.path.join(run.output_dir, top_k_file.FILE), product_id=predictions["product_id"],
                           label=predictions["label"], top_classes=predictions["top_classes"],
                           top_probabilities=predictions["top_probabilities"],
                           category_ids=run.labels.category_ids, k=run.cfg.save_top_k)


def _metrics_and_report(run: _Run, predictions: dict, top_classes, lookup, class_counts, summary: dict) -> None:
    """The metrics of a labelled split (each member's alone too) into summary, report.png, and the
    figures said."""
    cfg, members, labels = run.cfg, run.members, run.labels
    if cfg.split == "test":  # labelled after all: the other splits were compared before predicting
        _check_same_classes(cfg.data_dir, members[0].model_dir, labels)
    true, num_images = predictions["label"], predictions["num_images"]
    metrics = metrics_lib.compute_metrics(true, top_classes, num_images, labels, class_counts)
    for entry, member_top in zip(summary["members"], predictions["member_top_classes"]):
        alone = metrics_lib.compute_metrics(true, member_top, num_images, labels)
        entry.update(top1=alone["top1"], top5=alone["top5"], by_image_count=alone["by_image_count"])
    if lookup is not None:
        metrics["dup_lookup"] = _lookup_metrics(run, predictions, lookup, metrics)
    summary.update(metrics)
    name = members[0].model.name if len(members) == 1 else f"ensemble of {len(members)}"
    report.write_report(metrics, EvalFolder(run.output_dir).report_file, model_name=name,
                        fusion="+".join(m.fusion for m in members), split=cfg.split)
    run.log(f"{cfg.split}: top-1 {metrics['top1']:.4f}  top-5 {metrics['top5']:.4f}  ({metrics['products']} "
            f"products); by image count: "
            + ", ".join(f"{n}: {m['top1']:.3f}" for n, m in metrics["by_image_count"].items()))
    if len(members) > 1:
        for entry in summary["members"]:
            run.log(f"  member {entry['model_dir']} ({entry['checkpoint']}): top-1 {entry['top1']:.4f}  "
                    f"top-5 {entry['top5']:.4f}")


def _lookup_metrics(run: _Run, predictions: dict, lookup: dict, metrics: dict) -> dict:
    """metrics.json["dup_lookup"]: the gain over the model alone, and each level's figures."""
    true, num_images, labels = predictions["label"], predictions["num_images"], run.labels
    plain = metrics_lib.compute_metrics(true, predictions["top_classes"], num_images, labels)
    (product_top, overridden), (image_top, image_matched) = lookup["product"], lookup["image"]
    product = metrics_lib.compute_metrics(true, product_top, num_images, labels)
    image = metrics_lib.compute_metrics(true, image_top, num_images, labels)
    return {"level": run.cfg.dup_lookup_level, "overridden": lookup[run.cfg.dup_lookup_level][1],
            "top1_without": plain["top1"], "top5_without": plain["top5"],
            "top1_gain": metrics["top1"] - plain["top1"], "top5_gain": metrics["top5"] - plain["top5"],
            "product_level": {"overridden": overridden, "top1": product["top1"], "top5": product["top5"]},
            "image_level": {"matched": image_matched, "top1": image["top1"], "top5": image["top5"]}}


def _submission(run: _Run, predictions: dict, top_classes, class_counts) -> dict:
    """submission.csv: a row for every product of the input, the rejected and unreadable ones given
    the most frequent training category."""
    cfg, labels = run.cfg, run.labels
    fallback = submission_lib.most_frequent_category(labels, class_counts)
    submission = submission_lib.write_submission(
        EvalFolder(run.output_dir).submission_file, predictions["product_id"],
        labels.category_ids[top_classes[:, 0]] if len(top_classes) else [],
        data_folder.read_rejected(cfg.data_dir), fallback,
        all_product_ids=data_folder.read_product_ids(cfg.data_dir, cfg.split))
    run.log(f"submission.csv: {submission['rows']} rows ({submission['rejected_with_fallback']} rejected and "
            f"{submission['unreadable_with_fallback']} unreadable products given the most frequent training "
            f"category {fallback})")
    return submission


def _check_same_classes(data_dir: str, model_dir: str, labels: Labels) -> None:
    if not np.array_equal(read_labels(data_dir).category_ids, labels.category_ids):
        raise UserError(f"{data_dir}/labels.csv differs from the model's classes ({model_dir}/labels.csv)")
