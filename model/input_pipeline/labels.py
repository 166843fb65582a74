"""labels.csv: class index <-> Cdiscount category id, and the category tree above each class.

The file is written by `beam_convert` (docs/FORMATS.md section 1). It is read with the csv module because
category names are quoted and some contain commas and doubled quotes.
"""

import csv
import dataclasses
import io
import os

import numpy as np
import tensorflow as tf

import record_schema


@dataclasses.dataclass(frozen=True)
class Labels:
    category_ids: np.ndarray  # int64 [K]: class index -> category_id
    level1: tuple  # names, one per class ("" when the file has no tree)
    level2: tuple
    level3: tuple
    level1_index: np.ndarray  # int64 [K]: class index -> index into level1_names
    level2_index: np.ndarray
    level1_names: tuple  # distinct level1 names, sorted
    level2_names: tuple  # distinct (level1, level2) pairs as "level1/level2", sorted

    @property
    def num_classes(self) -> int:
        return len(self.category_ids)

    @property
    def has_hierarchy(self) -> bool:
        """True when the tree carries information (auxiliary heads are then worth training)."""
        return len(self.level1_names) > 1 or len(self.level2_names) > 1

    def class_of_category(self) -> dict:
        return {int(c): i for i, c in enumerate(self.category_ids)}


def read_labels(path: str) -> Labels:
    if tf.io.gfile.isdir(path):
        path = os.path.join(path, record_schema.LABELS_FILE)
    with tf.io.gfile.GFile(path) as f:
        reader = csv.DictReader(io.StringIO(f.read(), newline=""))
        missing = set(record_schema.LABELS_HEADER) - set(reader.fieldnames or ())
        if missing:
            raise ValueError(f"{path}: missing columns {sorted(missing)}")
        rows = sorted(reader, key=lambda row: int(row["label"]))
    if [int(r["label"]) for r in rows] != list(range(len(rows))):
        raise ValueError(f"{path}: labels are not 0..{len(rows) - 1}")
    level1 = tuple(r["category_level1"] or "" for r in rows)
    level2 = tuple(r["category_level2"] or "" for r in rows)
    level3 = tuple(r["category_level3"] or "" for r in rows)
    # level2 names repeat under different level1 parents, so a level2 node is the pair.
    level2_keys = tuple(f"{a}/{b}" for a, b in zip(level1, level2))
    level1_names = tuple(sorted(set(level1)))
    level2_names = tuple(sorted(set(level2_keys)))
    l1 = {n: i for i, n in enumerate(level1_names)}
    l2 = {n: i for i, n in enumerate(level2_names)}
    return Labels(
        category_ids=np.array([int(r["category_id"]) for r in rows], dtype=np.int64),
        level1=level1,
        level2=level2,
        level3=level3,
        level1_index=np.array([l1[n] for n in level1], dtype=np.int64),
        level2_index=np.array([l2[n] for n in level2_keys], dtype=np.int64),
        level1_names=level1_names,
        level2_names=level2_names,
    )
