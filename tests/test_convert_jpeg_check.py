"""The JPEG header check (beam_convert/jpeg_check.py)."""

import pytest

from beam_convert.jpeg_check import check_jpeg
from tests.convert_helpers import bomb_jpeg, png_bytes, sample_jpegs


JPEGS = sample_jpegs()


def test_check_jpeg_accepts_every_real_picture():
    assert [check_jpeg(j) for j in JPEGS] == [None] * 110


@pytest.mark.parametrize("data, reason", [
    (png_bytes(), "not_jpeg"),
    (b"GIF89a" + b"\x00" * 100, "not_jpeg"),
    (b"", "not_jpeg"),
    (JPEGS[0][:3000], "truncated_jpeg"),
    (bomb_jpeg(JPEGS[0]), "image_too_large"),
    (b"\xff\xd8\xff\xda\x00\x02" + b"\x00" * 20 + b"\xff\xd9", "bad_jpeg"),
])
def test_check_jpeg_rejects(data, reason):
    assert check_jpeg(data)[0] == reason
