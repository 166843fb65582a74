"""A beam_convert output folder as the model side reads it (docs/FORMATS.md section 1).

Paths may be on any filesystem TensorFlow knows (gs://, s3:// with its plugin, file://, ram://).
"""

from __future__ import annotations

import io
import json
import os

import numpy as np
import tensorflow as tf

import record_schema
from model.config import ImageSpec
from model.input_pipeline import dataset


def read_metadata(data_dir: str) -> dict:
    with tf.io.gfile.GFile(os.path.join(data_dir, record_schema.METADATA_FILE)) as f:
        return json.load(f)


def max_images(data_dir: str) -> int:
    """The image slots of the folder's records (metadata.json "max_images", beam_convert's
    --max_images): what every reader of the folder parses them with."""
    return int(read_metadata(data_dir).get("max_images", record_schema.MAX_IMAGES))


def split_products(metadata: dict, split: str) -> int:
    return int(metadata.get("splits", {}).get(split, {}).get("products", 0))


def split_pattern(data_dir: str, split: str) -> str:
    """Glob of a split's TFRecord shards."""
    return os.path.join(data_dir, record_schema.shard_pattern(split))


def read_product_ids(data_dir: str, split: str):
    """Every product id of a split (numpy int64), or None for a conversion that did not list them."""
    path = os.path.join(data_dir, record_schema.product_ids_name(split))
    if not tf.io.gfile.exists(path):
        return None
    with tf.io.gfile.GFile(path, "rb") as f:
        return np.load(io.BytesIO(f.read()))


def read_rejected(data_dir: str) -> list[dict]:
    """Every line of the rejection reports: products the converter did not convert."""
    rows = []
    for path in sorted(tf.io.gfile.glob(os.path.join(data_dir, record_schema.rejected_pattern()))):
        with tf.io.gfile.GFile(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def has_split(data_dir: str, metadata: dict, split: str) -> bool:
    """metadata.json counts products in the split and its shards are there."""
    return split_products(metadata, split) > 0 and bool(tf.io.gfile.glob(split_pattern(data_dir, split)))


def split_dataset(data_dir: str, split: str, image: ImageSpec, *, training: bool, batch_size: int,
                  skip_corrupt_records: bool = False, **options) -> tf.data.Dataset:
    """create_dataset over one split of data_dir (options: create_dataset's others), its records
    parsed with the folder's image slots (max_images)."""
    options.setdefault("max_images", max_images(data_dir))
    return dataset.create_dataset(split_pattern(data_dir, split), batch_size=batch_size, training=training,
                                  image_size=image.size, crop_size=image.crop,
                                  skip_corrupt_records=skip_corrupt_records, **options)
