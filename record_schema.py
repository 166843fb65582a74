"""The record both halves of the project agree on: one tf.train.Example per product.

`beam_convert` writes it, `model.input_pipeline` reads it; neither knows the other, only this
module. The format is fixed by docs/FORMATS.md section 2; change SCHEMA_VERSION with it.
"""

import functools
import hashlib
from typing import Sequence

SCHEMA_VERSION = 1
MAX_IMAGES = 4
IMAGE_SIZE = 180  # the side of every Cdiscount picture: the default decode size of the model side
UNLABELLED = -1
# The largest picture any side decodes, in pixels (a frame header declaring more is a decompression
# bomb: 4096 x 4096 RGB is 48 MiB decoded; Cdiscount's pictures are 180 x 180). The converter
# rejects it (image_too_large), serving and model.predict refuse it before any decode.
MAX_IMAGE_PIXELS = 4096 * 4096

PRODUCT_ID = "product_id"
CATEGORY_ID = "category_id"
LABEL = "label"
IMAGES = "images"
MASK = "mask"

SPLITS = ("train", "val", "test")
# The files of a conversion's output folder (docs/FORMATS.md section 1), besides the shards.
LABELS_FILE = "labels.csv"
LABELS_HEADER = ("label", "category_id", "category_level1", "category_level2", "category_level3")
METADATA_FILE = "metadata.json"
IMAGE_DIGESTS_FILE = "train_image_digests.npz"
# metadata.json["splits"][SPLIT][SHARD_FILES]: {shard file name: {"records": int, "bytes": int}}, every
# shard of the split (docs/FORMATS.md section 1): what a reader checks a split against by listing
# and size, without reading a record. A folder converted before it was recorded has no such key.
SHARD_FILES = "shard_files"


def shard_pattern(split: str) -> str:
    """Glob of a split's TFRecord shards inside an output folder."""
    return f"{split}-*-of-*.tfrecord"


def shard_name(split: str, index: int, count: int, suffix: str = "tfrecord") -> str:
    return f"{split}-{index:05d}-of-{count:05d}.{suffix}"


def product_ids_name(split: str) -> str:
    """The split's product ids, in record order (numpy int64): every product the shards hold."""
    return f"{split}_product_ids.npy"


REJECTED = "rejected"  # rejected-SSSSS-of-NNNNN.jsonl: one JSON line per product not converted


def rejected_pattern() -> str:
    """Glob of the rejection reports inside an output folder."""
    return f"{REJECTED}-*-of-*.jsonl"


def rejected_name(index: int = 0, count: int = 1) -> str:
    return shard_name(REJECTED, index, count, "jsonl")


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
    give equal bytes, and it is faster (BUILD_NOTES.md). tests/test_convert_units.py checks it
    against tf.train.Example and tf.io.parse_example.
    """
    if not 1 <= len(images) <= max_images:
        raise ValueError(f"product {product_id}: {len(images)} images, expected 1..{max_images}")
    padding = max_images - len(images)
    # Lengths first, then one join: each picture is copied once, not once per nesting level.
    parts = [b""]  # the entry's head, once the lengths are known
    pictures_length = 2 * padding
    for image in images:
        prefix = b"\x0a" + _varint(len(image))  # BytesList.value
        parts += (prefix, image)
        pictures_length += len(prefix) + len(image)
    parts.append(_EMPTY_BYTES_VALUE * padding)
    feature_head = b"\x0a" + _varint(pictures_length)  # Feature.bytes_list
    value_head = b"\x12" + _varint(len(feature_head) + pictures_length)  # map entry value
    body_length = len(_IMAGES_KEY_FIELD) + len(value_head) + len(feature_head) + pictures_length
    parts[0] = b"\x0a" + _varint(body_length) + _IMAGES_KEY_FIELD + value_head + feature_head
    features = (
        [_int64_entry(_CATEGORY_ID_KEY_FIELD, category_id)]
        + parts
        + [_int64_entry(_LABEL_KEY_FIELD, label), _mask_entry(len(images), padding),
           _int64_entry(_PRODUCT_ID_KEY_FIELD, product_id)]
    )
    features_length = sum(len(part) for part in features)
    return b"".join([b"\x0a", _varint(features_length)] + features)


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


_ONE_BYTE_VARINTS = [bytes([value]) for value in range(128)]


def _varint(value: int) -> bytes:
    if 0 <= value < 0x80:
        return _ONE_BYTE_VARINTS[value]
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


def _entry(key: str, feature: bytes) -> bytes:
    """One entry of Features.feature, a map<string, Feature>."""
    return _field(1, _field(1, key.encode()) + _field(2, feature))


def _int64_feature(values: Sequence[int]) -> bytes:
    return _field(3, _field(1, b"".join(_varint(v) for v in values)))  # Feature.int64_list, packed


def _int64_entry(key_field: bytes, value: int) -> bytes:
    packed = _varint(value)
    feature = b"\x1a" + bytes([len(packed) + 2]) + b"\x0a" + bytes([len(packed)]) + packed
    body = key_field + b"\x12" + bytes([len(feature)]) + feature
    return b"\x0a" + bytes([len(body)]) + body


_EMPTY_BYTES_VALUE = b"\x0a\x00"
_IMAGES_KEY_FIELD = _field(1, IMAGES.encode())
_CATEGORY_ID_KEY_FIELD = _field(1, CATEGORY_ID.encode())
_LABEL_KEY_FIELD = _field(1, LABEL.encode())
_PRODUCT_ID_KEY_FIELD = _field(1, PRODUCT_ID.encode())


@functools.lru_cache(maxsize=None)
def _mask_entry(real: int, padding: int) -> bytes:
    return _entry(MASK, _int64_feature([1] * real + [0] * padding))
