"""File access and TFRecord framing (beam_convert/files.py)."""

import tensorflow as tf

from beam_convert.files import tfrecord_frame
from tests.convert_helpers import sample_jpegs


JPEGS = sample_jpegs()


def test_tfrecord_frame_reads_back_with_tensorflow(tmp_path):
    path = tmp_path / "x.tfrecord"
    records = [b"", b"a", JPEGS[0]]
    path.write_bytes(b"".join(tfrecord_frame(r) for r in records))
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(path))] == records
