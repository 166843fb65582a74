"""The record both halves of the project agree on: one tf.train.Example per product.

`beam_convert` writes it, `model.input_pipeline` reads it; neither knows the other, only this
module. The format is fixed by CONTRACT.md section 2; change SCHEMA_VERSION with it.
"""

import hashlib
from typing import Sequence

import tensorflow as tf

SCHEMA_VERSION = 1
MAX_IMAGES = 4
UNLABELLED = -1

PRODUCT_ID = "product_id"
CATEGORY_ID = "category_id"
LABEL = "label"
IMAGES = "images"
MASK = "mask"

SPLITS = ("train", "val", "test")
LABELS_FILE = "labels.csv"
LABELS_HEADER = ("label", "category_id", "category_level1", "category_level2", "category_level3")
METADATA_FILE = "metadata.json"
IMAGE_DIGESTS_FILE = "train_image_digests.npz"


def shard_pattern(split: str) -> str:
    """Glob of a split's TFRecord shards inside an output folder."""
    return f"{split}-*-of-*.tfrecord"


def shard_name(split: str, index: int, count: int, suffix: str = "tfrecord") -> str:
    return f"{split}-{index:05d}-of-{count:05d}.{suffix}"


def image_digest(jpeg: bytes) -> int:
    """64-bit content digest of one picture's bytes, as a signed int64.

    Used for the leak-free split and for the duplicate-image lookup at evaluation time, so both
    must compute it the same way. 64 bits keep the expected number of collisions among the
    7.8 million distinct training images below 1e-5.
    """
    return int.from_bytes(hashlib.blake2b(jpeg, digest_size=8).digest(), "little", signed=True)


def encode_example(
    product_id: int,
    category_id: int,
    label: int,
    images: Sequence[bytes],
    max_images: int = MAX_IMAGES,
) -> bytes:
    """Serializes one product; `images` holds 1..max_images JPEGs in BSON order."""
    if not 1 <= len(images) <= max_images:
        raise ValueError(f"product {product_id}: {len(images)} images, expected 1..{max_images}")
    padding = max_images - len(images)
    feature = {
        PRODUCT_ID: _int64s([product_id]),
        CATEGORY_ID: _int64s([category_id]),
        LABEL: _int64s([label]),
        IMAGES: tf.train.Feature(bytes_list=tf.train.BytesList(value=list(images) + [b""] * padding)),
        MASK: _int64s([1] * len(images) + [0] * padding),
    }
    return tf.train.Example(features=tf.train.Features(feature=feature)).SerializeToString()


def feature_spec(max_images: int = MAX_IMAGES) -> dict:
    """`tf.io.parse_example` spec for the record."""
    return {
        PRODUCT_ID: tf.io.FixedLenFeature([1], tf.int64),
        CATEGORY_ID: tf.io.FixedLenFeature([1], tf.int64),
        LABEL: tf.io.FixedLenFeature([1], tf.int64),
        IMAGES: tf.io.FixedLenFeature([max_images], tf.string),
        MASK: tf.io.FixedLenFeature([max_images], tf.int64),
    }


def _int64s(values) -> tf.train.Feature:
    return tf.train.Feature(int64_list=tf.train.Int64List(value=values))
