"""File access and TFRecord framing (beam_convert/files.py)."""

import pytest
import tensorflow as tf

from beam_convert.files import tfrecord_frame
from tests.convert_helpers import sample_jpegs


JPEGS = sample_jpegs()


def test_tfrecord_frame_reads_back_with_tensorflow(tmp_path):
    path = tmp_path / "x.tfrecord"
    records = [b"", b"a", JPEGS[0]]
    path.write_bytes(b"".join(tfrecord_frame(r) for r in records))
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(path))] == records


def test_copy_range_copies_byte_intervals_in_the_kernel_and_through_python(tmp_path):
    import io

    from beam_convert import files

    source = tmp_path / "source"
    data = bytes(range(256)) * 1000
    source.write_bytes(data)
    intervals = [(0, None), (10, 20), (1000, None), (5, 5), (0, len(data))]
    expected = b"".join(data[start:end] for start, end in intervals)
    with open(tmp_path / "kernel", "wb") as out:  # a local file: os.copy_file_range
        out.write(b"head")  # buffered: must land before the copied bytes
        for start, end in intervals:
            files.copy_range(str(source), start, end, out)
    assert (tmp_path / "kernel").read_bytes() == b"head" + expected
    out = io.BytesIO()  # no file descriptor: through Python's buffers
    for start, end in intervals:
        files.copy_range(str(source), start, end, out)
    assert out.getvalue() == expected
    with pytest.raises(OSError, match="ends at byte"):
        files.copy_range(str(source), 0, len(data) + 1, io.BytesIO())
    with open(tmp_path / "short", "wb") as out, pytest.raises(OSError, match="ends at byte"):
        files.copy_range(str(source), 0, len(data) + 1, out)
