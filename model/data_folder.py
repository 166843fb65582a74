"""A beam_convert output folder as the model side reads it (docs/FORMATS.md section 1).

Free of TensorFlow: train.py's and evaluate.py's flag checks use it before TensorFlow loads.
"""

from __future__ import annotations

import glob
import json
import os

import record_schema


def read_metadata(data_dir: str) -> dict:
    with open(os.path.join(data_dir, record_schema.METADATA_FILE)) as f:
        return json.load(f)


def split_products(metadata: dict, split: str) -> int:
    return int(metadata.get("splits", {}).get(split, {}).get("products", 0))


def split_pattern(data_dir: str, split: str) -> str:
    """Glob of a split's TFRecord shards."""
    return os.path.join(data_dir, record_schema.shard_pattern(split))


def read_rejected(data_dir: str) -> list[dict]:
    """Every line of the rejection reports: products the converter did not convert."""
    rows = []
    for path in sorted(glob.glob(os.path.join(data_dir, record_schema.rejected_pattern()))):
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows
