"""The record both halves of the project agree on: one tf.train.Example per product.

`beam_convert` writes it, `model.input_pipeline` reads it; neither knows the other, only this
module. The format is fixed by CONTRACT.md section 2; change SCHEMA_VERSION with it.
"""

import functools
import hashlib
from typing import Sequence

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
    """Serializes one product; `images` holds 1..max_images JPEGs in BSON order.

    Written straight in the protobuf wire format of tf.train.Example rather than through
    TensorFlow: Beam workers then never load TensorFlow (seconds per worker process, and
    ~0.5 GB on every Dataflow worker), keys come out in one fixed order so equal products
    give equal bytes, and it is faster (BUILD_NOTES.md). tests/test_record_schema.py checks it
    against tf.train.Example and tf.io.parse_example.
    """
    if not 1 <= len(images) <= max_images:
        raise ValueError(f"product {product_id}: {len(images)} images, expected 1..{max_images}")
    padding = max_images - len(images)
    pictures = b"".join([_field(1, image) for image in images]) + _EMPTY_BYTES_VALUE * padding
    features = b"".join((
        _entry(CATEGORY_ID, _int64_feature([category_id])),
        _entry(IMAGES, _field(1, pictures)),  # Feature.bytes_list
        _entry(LABEL, _int64_feature([label])),
        _mask_entry(len(images), padding),
        _entry(PRODUCT_ID, _int64_feature([product_id])),
    ))
    return _field(1, features)


def feature_spec(max_images: int = MAX_IMAGES) -> dict:
    """`tf.io.parse_example` spec for the record."""
    import tensorflow as tf  # only the reading side needs it

    return {
        PRODUCT_ID: tf.io.FixedLenFeature([1], tf.int64),
        CATEGORY_ID: tf.io.FixedLenFeature([1], tf.int64),
        LABEL: tf.io.FixedLenFeature([1], tf.int64),
        IMAGES: tf.io.FixedLenFeature([max_images], tf.string),
        MASK: tf.io.FixedLenFeature([max_images], tf.int64),
    }


def _varint(value: int) -> bytes:
    value &= 0xFFFFFFFFFFFFFFFF  # negative int64 as two's complement, ten bytes
    out = bytearray()
    while value > 0x7F:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def _field(number: int, payload: bytes) -> bytes:
    """A length-delimited field (wire type 2)."""
    return _varint(number << 3 | 2) + _varint(len(payload)) + payload


_EMPTY_BYTES_VALUE = b"\x0a\x00"


@functools.lru_cache(maxsize=None)
def _mask_entry(real: int, padding: int) -> bytes:
    return _entry(MASK, _int64_feature([1] * real + [0] * padding))


def _entry(key: str, feature: bytes) -> bytes:
    """One entry of Features.feature, a map<string, Feature>."""
    return _field(1, _field(1, key.encode()) + _field(2, feature))


def _int64_feature(values: Sequence[int]) -> bytes:
    return _field(3, _field(1, b"".join(_varint(v) for v in values)))  # Feature.int64_list, packed
