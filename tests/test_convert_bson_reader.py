"""BSON framing (beam_convert/bson_reader.py): document offsets, bad framing, the key peek."""

import io

import bson
import pytest

from beam_convert.bson_reader import CorruptBsonError, iter_documents, peek_keys
from tests.convert_helpers import SAMPLE_BSON


def test_iter_documents_finds_the_real_offsets():
    with open(SAMPLE_BSON, "rb") as f:
        found = [(offset, len(doc)) for offset, doc in iter_documents(f, "x")]
    assert len(found) == 82
    assert found[:5] == [(0, 6979), (6979, 7318), (14297, 5455), (19752, 4580), (24332, 6346)]


def test_iter_documents_reads_a_range_only():
    with open(SAMPLE_BSON, "rb") as f:
        f.seek(14297)
        assert [o for o, _ in iter_documents(f, "x", 14297, 24332)] == [14297, 19752]


@pytest.mark.parametrize("data, reason", [
    (b"\x02\x00\x00\x00", "impossible document length 2"),
    (b"\xff\xff\xff\x7f" + b"\x00" * 10, "impossible document length"),
    (b"\x20\x00\x00\x00\x00\x00", "truncated: document of 32 bytes, only 6 bytes left"),
    (b"\x05\x00", "truncated: 2 bytes left"),
    (b"\x05\x00\x00\x00\x01", "does not end with a NUL byte"),
])
def test_iter_documents_names_the_offset_of_bad_framing(data, reason):
    good = bson.encode({"_id": 1})
    with pytest.raises(CorruptBsonError, match=reason) as error:
        list(iter_documents(io.BytesIO(good + data), "f.bson"))
    assert error.value.offset == len(good)
    assert f"f.bson: corrupt BSON document at byte offset {len(good)}" in str(error.value)


@pytest.mark.parametrize("document", [
    {"_id": 7, "imgs": [], "category_id": 1000010653},
    {"_id": 2**40, "imgs": [], "category_id": 5},
    {"category_id": 9, "_id": 3},
    {"_id": 4, "imgs": []},
    {"_id": "str", "category_id": 2**40},
])
def test_peek_keys_agrees_with_a_full_decode(document):
    keys = peek_keys(bson.encode(document))
    expected_id = document["_id"] if isinstance(document["_id"], int) else None
    assert (keys.product_id, keys.category_id) == (expected_id, document.get("category_id"))
