"""The record the converter writes (record_schema.encode_example)."""

import pytest
import tensorflow as tf

import record_schema
from tests.convert_helpers import sample_jpegs


JPEGS = sample_jpegs()


@pytest.mark.parametrize("count", [1, 2, 4])
def test_encode_example_equals_tf_train_example(count):
    images = JPEGS[:count]
    padded = images + [b""] * (4 - count)
    expected = tf.train.Example(features=tf.train.Features(feature={
        "product_id": tf.train.Feature(int64_list=tf.train.Int64List(value=[2**40 + 3])),
        "category_id": tf.train.Feature(int64_list=tf.train.Int64List(value=[1000010653])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[-1])),
        "images": tf.train.Feature(bytes_list=tf.train.BytesList(value=padded)),
        "mask": tf.train.Feature(int64_list=tf.train.Int64List(value=[1] * count + [0] * (4 - count))),
    })).SerializeToString(deterministic=True)
    encoded = record_schema.encode_example(2**40 + 3, 1000010653, -1, images)
    assert encoded == expected
    parsed = tf.io.parse_single_example(encoded, record_schema.feature_spec())
    assert parsed["label"].numpy().tolist() == [-1]
    assert [bytes(b) for b in parsed["images"].numpy()] == padded


def test_encode_example_refuses_a_wrong_image_count():
    with pytest.raises(ValueError, match="5 images"):
        record_schema.encode_example(1, 1, 1, JPEGS[:5])
