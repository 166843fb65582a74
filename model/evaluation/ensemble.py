"""An ensemble of trained models (evaluate.py --model_dir=A,B[,C...]): which members, with which
checkpoint and weight, and how their class probabilities are combined.

Pure functions on small inputs; the prediction loop (predict.py) calls `combine` batch by batch,
so no [N, K] matrix is ever held (the real val split is ~350k x 5,270).
"""

from __future__ import annotations

import os

import numpy as np

from model import config
from model.model_dir import CHECKPOINTS
from model.errors import UserError

MEANS = config.ENSEMBLE_MEANS
_FLOOR = 1e-12  # log(0) guard of the geometric mean: a class one member rules out keeps a trace


def split_list(text: str) -> list[str]:
    """'A, B,C' -> ['A', 'B', 'C'] (a flag's comma list; empty items dropped)."""
    return [item.strip() for item in str(text).split(",") if item.strip()]


def member_checkpoints(text: str, model_dirs: list[str]) -> list[str]:
    """--checkpoint: one value for every member, or one per member in --model_dir order."""
    values = split_list(text) or ["final"]
    if len(values) == 1:
        values = values * len(model_dirs)
    if len(values) != len(model_dirs):
        raise UserError(f"--checkpoint has {len(values)} values for {len(model_dirs)} models "
                        f"({', '.join(model_dirs)}): give one, or one per model")
    for value in values:
        if value not in CHECKPOINTS:
            raise UserError(f"--checkpoint must be {' or '.join(CHECKPOINTS)}, got {value!r}")
    return values


def check_distinct(model_dirs: list[str], checkpoints: list[str]) -> None:
    """An ensemble lists each model once: the same folder's same checkpoint twice (however the path
    is spelled) would only cost its prediction twice, and weigh it twice without saying so. The
    final and the best model of one run are two models."""
    seen = {}
    for model_dir, checkpoint in zip(model_dirs, checkpoints):
        key = (_same_path(model_dir), checkpoint)
        if key in seen:
            raise UserError(f"--model_dir lists {seen[key]} twice ({checkpoint} model, also as {model_dir}): an ensemble "
                            f"member counts once; to weigh it more, use --ensemble_weights")
        seen[key] = model_dir


def _same_path(path: str) -> str:
    """A spelling of a path that two spellings of one folder share: local paths absolute and
    normalised, URIs (gs://...) without a trailing slash."""
    if "://" in path:
        return path.rstrip("/")
    return os.path.normpath(os.path.abspath(path))


def member_weights(text: str | None, model_dirs: list[str]) -> np.ndarray:
    """--ensemble_weights: one non-negative number per member (any scale), default all equal."""
    if not text:
        return np.ones(len(model_dirs), np.float64) / len(model_dirs)
    values = split_list(text)
    if len(values) != len(model_dirs):
        raise UserError(f"--ensemble_weights has {len(values)} weights for {len(model_dirs)} models "
                        f"({', '.join(model_dirs)}): give one per model")
    try:
        weights = np.array([float(v) for v in values], np.float64)
    except ValueError:
        raise UserError(f"--ensemble_weights must be numbers, got {text!r}") from None
    if not np.isfinite(weights).all() or (weights < 0).any() or weights.sum() <= 0:
        raise UserError(f"--ensemble_weights must be non-negative with a positive sum, got {text!r}")
    return weights / weights.sum()


def combine(probabilities, weights, mean: str = "arithmetic") -> np.ndarray:
    """The ensemble's class probabilities [B, K] from each member's [B, K] (same class order).

    arithmetic: sum_m w_m p_m. geometric: prod_m p_m ** w_m, renormalised to sum 1 a row (a
    class any member rules out is ruled out; the arithmetic mean is the safer default when
    members are unequally calibrated). Weights are normalised to sum 1.
    """
    if mean not in MEANS:
        raise ValueError(f"mean must be one of {MEANS}, got {mean!r}")
    stacked = np.stack([np.asarray(p, np.float64) for p in probabilities])  # [M, B, K]
    weights = np.asarray(weights, np.float64)
    if len(weights) != len(stacked):
        raise ValueError(f"{len(weights)} weights for {len(stacked)} members")
    weights = weights / weights.sum()
    if mean == "arithmetic":
        return np.tensordot(weights, stacked, axes=1).astype(np.float32)
    log_mean = np.tensordot(weights, np.log(np.maximum(stacked, _FLOOR)), axes=1)
    log_mean -= log_mean.max(axis=-1, keepdims=True)  # exp without overflow; cancels in the ratio
    unnormalised = np.exp(log_mean)
    return (unnormalised / unnormalised.sum(axis=-1, keepdims=True)).astype(np.float32)


def check_same_classes(model_dirs: list[str], label_sets) -> None:
    """Every member must predict the same classes in the same order (labels.csv), else one line
    naming the first member and the one that differs."""
    first = np.asarray(label_sets[0].category_ids)
    for model_dir, labels in zip(model_dirs[1:], label_sets[1:]):
        if not np.array_equal(first, np.asarray(labels.category_ids)):
            raise UserError(f"{model_dirs[0]}/labels.csv and {model_dir}/labels.csv differ: the models of an "
                            f"ensemble must have the same classes (trained on the same data folder's labels)")
