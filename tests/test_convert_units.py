"""The pure pieces of the conversion: BSON framing, JPEG check, products, labels, the record."""

import io
import time

import bson
import pytest
import tensorflow as tf

import record_schema
from beam_convert import labels, products
from beam_convert.bson_reader import CorruptBsonError, iter_documents, peek_keys
from beam_convert.files import tfrecord_frame
from beam_convert.jpeg_check import check_jpeg
from tests.convert_helpers import CATEGORIES_CSV, SAMPLE_BSON, bomb_jpeg, png_bytes, product, sample_jpegs

JPEGS = sample_jpegs()


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


def test_to_product_pads_nothing_and_counts_extra_images():
    outcome = products.to_product(product(5, JPEGS[:6], 77), labels={77: 3}, max_images=4)
    assert outcome == products.Product(5, 77, 3, tuple(JPEGS[:4]), 2)


def test_to_product_unlabelled_ignores_labels():
    outcome = products.to_product(product(5, JPEGS[:1], None), labels=None)
    assert (outcome.category_id, outcome.label) == (-1, -1)


def test_split_key_ignores_image_order_and_the_split_is_stable():
    digests = [record_schema.image_digest(j) for j in JPEGS[:3]]
    key = products.split_key(digests)
    assert key == products.split_key(digests[::-1]) == min(digests)
    splits = [products.choose_split(products.split_key([record_schema.image_digest(j)]), 0.3) for j in JPEGS]
    assert 0.15 < splits.count("val") / len(splits) < 0.45
    assert products.choose_split(key, 0.0) == "train"


def test_read_categories_parses_quoted_commas():
    categories = labels.read_categories(CATEGORIES_CSV.read_text("utf-8"), "category_names.csv")
    assert len(categories) == 5270
    assert [c.category_id for c in categories] == sorted(c.category_id for c in categories)
    assert len({c.level1 for c in categories}) == 49
    assert any('VELO ENFANT (10" - 12"' in c.level3 for c in categories)


@pytest.mark.parametrize("text, message", [
    ("id,a,b,c\n1,x,y,z\n", "header"),
    ("category_id,category_level1,category_level2,category_level3\nx,a,b,c\n", ":2: category_id 'x'"),
    ("category_id,category_level1,category_level2,category_level3\n1,a,b\n", ":2: 3 fields"),
    ("category_id,category_level1,category_level2,category_level3\n1,a,b,c\n1,a,b,c\n", "appears twice"),
])
def test_read_categories_errors_name_the_line(text, message):
    with pytest.raises(ValueError, match=message):
        labels.read_categories(text, "cats.csv")


def test_labels_csv_round_trips_through_a_csv_reader():
    categories = [labels.Category(2, "A, B", 'say "x"', "c"), labels.Category(9)]
    text = labels.labels_csv(categories)
    assert text.splitlines()[0] == ",".join(record_schema.LABELS_HEADER)
    assert text.splitlines()[1] == '0,2,"A, B","say ""x""",c'


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


def test_tfrecord_frame_reads_back_with_tensorflow(tmp_path):
    path = tmp_path / "x.tfrecord"
    records = [b"", b"a", JPEGS[0]]
    path.write_bytes(b"".join(tfrecord_frame(r) for r in records))
    assert [r.numpy() for r in tf.data.TFRecordDataset(str(path))] == records


def test_progress_reports_products_done_and_rate(tmp_path, monkeypatch, capsys):
    from beam_convert import __main__ as cli

    progress_dir = tmp_path / "progress"
    progress_dir.mkdir()
    (progress_dir / "index-00000.json").write_text('{"documents": 1000}')
    (progress_dir / "range-00000-000000000000000.json").write_text('{"documents": 250, "products": 249}')
    monkeypatch.setattr(cli, "PROGRESS_SECONDS", 0.05)
    progress = cli.Progress(str(tmp_path))
    progress.start()
    time.sleep(0.3)
    progress.stop.set()
    progress.join()
    line = capsys.readouterr().err.strip().splitlines()[-1]
    assert "250 products of 1,000 (25%)" in line and "products/s" in line
