"""The conversion stage (beam_convert/convert.py, ConvertRanges): in a TestPipeline on hand-made
index ranges, what a range writes and what it rejects; then, through the command, a re-run that
takes up the ranges an interrupted job finished."""

import glob
import json

import apache_beam as beam
import bson
import numpy as np
import pytest
import tensorflow as tf
from apache_beam.testing.util import BeamAssertException, assert_that

import record_schema
from beam_convert import mix
from beam_convert.convert import ConvertRanges
from beam_convert.job import DIGEST_ROW, DatasetIndex, IndexRange, RangeResult, progress_marker, rejection_report
from tests.convert_helpers import (
    SAMPLE_BSON, convert, counters, png_bytes, product, read_metadata, record_multiset, sample_jpegs, stage_config,
    stage_pipeline, write_bson)

JPEGS = sample_jpegs()
GOOD_CATEGORY = 1000010653


# --- ConvertRanges in a TestPipeline -----------------------------------------------------------------

def _stored_results(tmp_dir) -> dict[str, RangeResult]:
    """The RangeResult each converted range stored in its progress marker, by range id."""
    stored = {}
    for marker in glob.glob(progress_marker(tmp_dir, "range")):
        with open(marker) as f:
            result = RangeResult.from_json(json.load(f)["result"])
        stored[result.range_id] = result
    return stored


def _is_the_stored_results(tmp_dir):
    """A matcher: the stage's one element is the list of every range's result, as its marker holds it."""
    def match(elements):
        if len(elements) != 1 or {r.range_id: r for r in elements[0]} != _stored_results(tmp_dir):
            raise BeamAssertException(f"{elements} are not the results in the markers")
    return match


def _convert_ranges(tmp_path, index_ranges, index, **fields):
    """Runs ConvertRanges alone; returns (its results by range id, the job's counters)."""
    config = stage_config(tmp_path, **fields)
    with stage_pipeline() as pipeline:
        dataset_index = pipeline | "Index" >> beam.Create([index])
        results = pipeline | "Ranges" >> beam.Create(index_ranges) | ConvertRanges(config, dataset_index)
        assert_that(results, _is_the_stored_results(config.tmp_dir))
    return _stored_results(config.tmp_dir), counters(pipeline.result)


def _whole_file_range(path, offsets, labelled=True):
    return IndexRange(str(path), 0, 0, path.stat().st_size, len(offsets), labelled)


def _index_of(path, labelled=True, seen=(GOOD_CATEGORY,), keepers=None, documents=0):
    return DatasetIndex(frozenset({str(path)} if labelled else ()), seen if labelled else (), keepers or {}, documents, 0)


def _tmp_records(split_file) -> list[dict]:
    spec = record_schema.feature_spec()
    records = []
    for raw in tf.data.TFRecordDataset(split_file.path):
        parsed = tf.io.parse_single_example(raw, spec)
        records.append({"product_id": int(parsed["product_id"][0]), "label": int(parsed["label"][0]),
                        "category_id": int(parsed["category_id"][0]),
                        "images": [bytes(b) for b in parsed["images"].numpy() if b]})
    return records


def _rejection_rows(tmp_dir, range_id) -> list[dict]:
    with open(rejection_report(tmp_dir, range_id)) as f:
        return [json.loads(line) for line in f]


def test_a_range_writes_its_valid_products_and_reports_each_rejection_with_its_reason(tmp_path):
    path = tmp_path / "mixed.bson"
    documents = [
        product(1, JPEGS[:1]),
        product(2, [png_bytes()]),
        product(3, []),
        product(4, JPEGS[1:2], category_id=123),
        {"_id": "abc", "imgs": [{"picture": bson.Binary(JPEGS[2])}], "category_id": GOOD_CATEGORY},
        product(300, JPEGS[10:15]),  # five images: the first four are kept, and it is counted
        product(1, JPEGS[3:4]),  # a repeated _id: the index keeps the first occurrence
    ]
    offsets = write_bson(path, documents)
    index_range = _whole_file_range(path, offsets)
    results, counted = _convert_ranges(tmp_path, [index_range], _index_of(path, keepers={1: (0, offsets[0])}),
                                       val_fraction=0)
    result = results[index_range.range_id]
    expected_rejections = {"not_jpeg": 1, "no_images": 1, "unknown_category_id": 1, "bad_id": 1, "duplicate_id": 1}
    assert result.rejected == expected_rejections
    assert counted == {**expected_rejections, "train_products": 2, "too_many_images": 1}
    assert (result.too_many_images, result.images_per_product) == (1, {"1": 1, "4": 1})
    assert result.records.keys() == {"train"} and (result.records["train"].products, result.records["train"].images) == (2, 5)
    records = {record["product_id"]: record for record in _tmp_records(result.records["train"])}
    assert records[1]["images"] == JPEGS[:1] and records[300]["images"] == JPEGS[10:14]
    assert {record["category_id"] for record in records.values()} == {GOOD_CATEGORY}
    rows = _rejection_rows(stage_config(tmp_path).tmp_dir, index_range.range_id)
    assert [(row["_id"], row["offset"], row["reason"]) for row in rows] == [
        (2, offsets[1], "not_jpeg"), (3, offsets[2], "no_images"), (4, offsets[3], "unknown_category_id"),
        (None, offsets[4], "bad_id"), (1, offsets[6], "duplicate_id")]
    assert all(row["source"] == str(path) and row["detail"] for row in rows)
    assert f"at byte offset {offsets[0]}" in rows[-1]["detail"], "names where the kept occurrence is"
    digests = np.load(result.digests)
    assert digests.dtype == DIGEST_ROW and sorted(digests["digest"].tolist()) == sorted(
        record_schema.image_digest(jpeg) for jpeg in JPEGS[:1] + JPEGS[10:14])


def test_a_range_writes_its_records_and_their_ids_in_bucket_order(tmp_path):
    path = tmp_path / "many.bson"
    offsets = write_bson(path, [product(7919 * n % 1000, JPEGS[n % 40:n % 40 + 1]) for n in range(60)])
    index_range = _whole_file_range(path, offsets)
    results, _ = _convert_ranges(tmp_path, [index_range], _index_of(path), val_fraction=0, range_size=60)
    split_file = results[index_range.range_id].records["train"]
    ids = np.load(split_file.ids)
    assert [record["product_id"] for record in _tmp_records(split_file)] == ids.tolist()
    buckets = mix.bucket_count(60)
    assert ids.tolist() == ids[mix.range_order(ids, buckets)].tolist() and results[index_range.range_id].buckets == buckets
    assert np.load(split_file.sizes).sum() == (tmp_path / "out" / "_tmp-test").joinpath(
        "records", "train", f"{index_range.range_id}.tfrecord").stat().st_size


def test_labels_are_places_in_the_categories_file_or_else_in_the_categories_seen(tmp_path):
    from beam_convert.categories import Category

    path = tmp_path / "labelled.bson"
    offsets = write_bson(path, [product(n, JPEGS[n:n + 1], category_id=[500, 300, 400][n % 3]) for n in range(6)])
    index = _index_of(path, seen=(300, 400, 500))
    index_range = _whole_file_range(path, offsets)
    results, _ = _convert_ranges(tmp_path / "seen", [index_range], index, val_fraction=0)
    labels = {r["category_id"]: r["label"] for r in _tmp_records(results[index_range.range_id].records["train"])}
    assert labels == {300: 0, 400: 1, 500: 2}
    categories = tuple(Category(category_id) for category_id in (100, 300, 400, 500))
    results, _ = _convert_ranges(tmp_path / "file", [index_range], index, val_fraction=0, categories=categories)
    labels = {r["category_id"]: r["label"] for r in _tmp_records(results[index_range.range_id].records["train"])}
    assert labels == {300: 1, 400: 2, 500: 3}


def test_an_unlabelled_range_writes_test_records_without_labels_or_digests(tmp_path):
    path = tmp_path / "test.bson"
    offsets = write_bson(path, [product(100 + n, JPEGS[n:n + 1], category_id=None) for n in range(5)])
    index_range = _whole_file_range(path, offsets, labelled=False)
    results, counted = _convert_ranges(tmp_path, [index_range], _index_of(path, labelled=False))
    result = results[index_range.range_id]
    assert result.records.keys() == {"test"} and result.digests is None and result.rejected == {}
    records = _tmp_records(result.records["test"])
    assert sorted(r["product_id"] for r in records) == [100, 101, 102, 103, 104]
    assert {(r["label"], r["category_id"]) for r in records} == {(record_schema.UNLABELLED, record_schema.UNLABELLED)}
    assert counted == {"test_products": 5}


def test_the_split_follows_val_fraction_over_several_ranges(tmp_path):
    path = tmp_path / "split.bson"
    offsets = write_bson(path, [product(n, JPEGS[n % 110:n % 110 + 1]) for n in range(100)])
    ranges = [IndexRange(str(path), 0, offsets[start], offsets[start + 50] if start == 0 else path.stat().st_size,
                         50, True) for start in (0, 50)]
    results, counted = _convert_ranges(tmp_path, ranges, _index_of(path), val_fraction=0.3, range_size=50)
    assert len(results) == 2
    assert counted["train_products"] + counted["val_products"] == 100 and 10 <= counted["val_products"] <= 50


def _invalid_bson_file(path):
    body = b"\x07garbage" + bytes(40)
    documents = [bson.encode(product(1, JPEGS[:1])), (len(body) + 5).to_bytes(4, "little") + body + b"\x00",
                 bson.encode(product(2, JPEGS[1:2]))]
    return write_bson(path, documents)


def test_a_document_that_is_not_bson_fails_the_stage_naming_the_file_and_the_byte_offset(tmp_path):
    path = tmp_path / "invalid.bson"
    offsets = _invalid_bson_file(path)
    with pytest.raises(Exception, match=f"{path}: corrupt BSON document at byte offset {offsets[1]}: invalid BSON"):
        _convert_ranges(tmp_path, [_whole_file_range(path, offsets)], _index_of(path))


def test_skip_corrupt_reports_a_document_that_is_not_bson_and_converts_the_rest(tmp_path):
    path = tmp_path / "invalid.bson"
    offsets = _invalid_bson_file(path)
    index_range = _whole_file_range(path, offsets)
    results, counted = _convert_ranges(tmp_path, [index_range], _index_of(path), skip_corrupt=True, val_fraction=0)
    assert results[index_range.range_id].rejected == {"corrupt_bson": 1}
    assert counted == {"corrupt_bson": 1, "train_products": 2}
    (row,) = _rejection_rows(stage_config(tmp_path).tmp_dir, index_range.range_id)
    assert (row["_id"], row["offset"], row["reason"]) == (None, offsets[1], "corrupt_bson")


def test_a_range_finished_by_an_earlier_run_is_taken_from_its_marker(tmp_path, monkeypatch):
    from beam_convert.convert import ConvertRange

    path = tmp_path / "resume.bson"
    offsets = write_bson(path, [product(n, JPEGS[n:n + 1]) for n in range(4)] + [product(9, [])])
    ranges = [IndexRange(str(path), 0, offsets[0], offsets[2], 2, True),
              IndexRange(str(path), 0, offsets[2], path.stat().st_size, 3, True)]
    first, _ = _convert_ranges(tmp_path, ranges, _index_of(path), range_size=2)

    def never(self, *unused):
        raise AssertionError("a finished range converted again")

    monkeypatch.setattr(ConvertRange, "_convert", never)
    again, counted = _convert_ranges(tmp_path, ranges, _index_of(path), range_size=2)
    assert again == first
    assert counted == {"ranges_resumed": 2, "no_images": 1}, "a resumed range's rejections still count"


def test_ranges_an_earlier_version_wrote_in_input_order_are_converted_again(tmp_path, monkeypatch):
    """Markers without "buckets" hold records in input order, which finalize cannot deal into shards."""
    from beam_convert.convert import ConvertRange

    path = tmp_path / "resume.bson"
    offsets = write_bson(path, [product(n, JPEGS[n:n + 1]) for n in range(4)])
    ranges = [IndexRange(str(path), 0, offsets[0], offsets[2], 2, True),
              IndexRange(str(path), 0, offsets[2], path.stat().st_size, 2, True)]
    first, _ = _convert_ranges(tmp_path, ranges, _index_of(path), range_size=2)
    old_marker = progress_marker(stage_config(tmp_path).tmp_dir, "range", ranges[0].range_id)
    with open(old_marker) as f:
        data = json.load(f)
    del data["result"]["buckets"]
    with open(old_marker, "w") as f:
        json.dump(data, f)
    converted = []
    convert_range = ConvertRange._convert
    monkeypatch.setattr(ConvertRange, "_convert",
                        lambda self, *a: converted.append(a[0].range_id) or convert_range(self, *a))
    again, counted = _convert_ranges(tmp_path, ranges, _index_of(path), range_size=2)
    assert converted == [ranges[0].range_id] and counted["ranges_resumed"] == 1
    assert again == first


# --- through the command ------------------------------------------------------------------------------


def test_an_interrupted_job_resumes_without_redoing_finished_ranges(tmp_path, monkeypatch, capsys):
    from beam_convert.convert import ConvertRange

    out = tmp_path / "out"
    args = (f"--input={SAMPLE_BSON}", f"--output_dir={out}", "--range_size=10")
    original = ConvertRange.process
    calls = []

    def fails_on_the_fourth_range(self, index_range, index):
        calls.append(index_range.range_id)
        if len(calls) == 4:
            raise RuntimeError("worker lost")
        yield from original(self, index_range, index)

    monkeypatch.setattr(ConvertRange, "process", fails_on_the_fourth_range)
    assert convert(*args) == 1
    assert "run the same command again to resume" in capsys.readouterr().err
    assert not (out / "metadata.json").exists()
    monkeypatch.setattr(ConvertRange, "process", original)
    converted = []
    convert_range = ConvertRange._convert

    def spy(self, index_range, index):
        converted.append(index_range.range_id)
        return convert_range(self, index_range, index)

    monkeypatch.setattr(ConvertRange, "_convert", spy)
    assert convert(*args) == 0
    assert "resuming the unfinished run" in capsys.readouterr().err
    assert len(converted) == 9 - 3 and not set(converted) & set(calls[:3])
    clean = tmp_path / "clean"
    assert convert(f"--input={SAMPLE_BSON}", f"--output_dir={clean}", "--range_size=10") == 0
    assert record_multiset(out) == record_multiset(clean)
    assert read_metadata(out)["images_per_product"] == read_metadata(clean)["images_per_product"]
    assert read_metadata(out)["rejected"] == {}
