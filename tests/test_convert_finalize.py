"""The finalize stage (beam_convert/finalize.py, RunFinalize): in a TestPipeline on hand-made range
files, the shards (even, mixed, their id lists), metadata.json and labels.csv, the image digest
table, and a run that converted nothing; then on the sample's conversion."""

import collections
import glob
import json
import os

import apache_beam as beam
import numpy as np
import pytest
from apache_beam.testing.util import BeamAssertException, assert_that

import record_schema
from beam_convert import mix
from beam_convert.categories import Category
from beam_convert.finalize import RunFinalize
from beam_convert.job import DIGEST_ROW, SPLIT_CODES, DatasetIndex, RangeResult, rejection_report
from tests.convert_helpers import (
    read_labels, read_metadata, read_payloads, read_records, stage_config, stage_pipeline,
    write_range_files)


# --- RunFinalize in a TestPipeline ------------------------------------------------------------------

def _index(documents, seen=(), corrupt=0):
    return DatasetIndex(frozenset({"in.bson"}), tuple(seen), {}, documents, corrupt)


def _ranges(config, sizes, split="train", first_id=0):
    """Ranges of `sizes` products each, ids ascending through them (as in a sorted input)."""
    results, next_id = [], first_id
    for number, size in enumerate(sizes):
        range_id = f"00000-{next_id:015d}"
        split_file = write_range_files(config, range_id, split, range(next_id, next_id + size))
        results.append(RangeResult(range_id, {split: split_file}, {"1": size}, {}, 0, None,
                                   mix.bucket_count(config.range_size)))
        next_id += size
    return results


def _is_the_metadata_file(output_dir):
    def match(elements):
        with open(os.path.join(output_dir, record_schema.METADATA_FILE)) as f:
            if elements != [json.load(f)]:
                raise BeamAssertException(f"{elements} is not what metadata.json holds")
    return match


def _finalize(config, results, index, inputs=("in.bson",)) -> dict:
    """Runs RunFinalize alone on `results`; returns the metadata it wrote."""
    with stage_pipeline() as pipeline:
        dataset_index = pipeline | "Index" >> beam.Create([index])
        metadata = pipeline | "Results" >> beam.Create([results]) | RunFinalize(config, list(inputs), dataset_index)
        assert_that(metadata, _is_the_metadata_file(config.output_dir))
    return read_metadata(config.output_dir)


def _shard_ids(output_dir, split) -> list[list[int]]:
    """Each shard's product ids, shards in name order, records in file order."""
    paths = sorted(glob.glob(os.path.join(output_dir, record_schema.shard_pattern(split))))
    return [[int(record.split()[1]) for record in read_payloads(path)] for path in paths]


@pytest.mark.parametrize("sizes, num_shards, expected", [
    ([800], 4, [200] * 4),  # more shards than ranges
    ([100] * 8, 5, [160] * 5),  # shards across ranges
    ([300, 300, 200], None, [266, 267, 267]),  # the default: one a range, evened out
    ([30], 100, [1] * 30),  # fewer records than shards: one record a shard, never an empty one
], ids=["more_shards_than_ranges", "fewer_shards_than_ranges", "one_per_range", "capped_at_one_record"])
def test_shards_are_even_whatever_the_ranges(tmp_path, sizes, num_shards, expected):
    config = stage_config(tmp_path, num_shards=num_shards, range_size=max(sizes))
    metadata = _finalize(config, _ranges(config, sizes), _index(sum(sizes)))
    shards = _shard_ids(config.output_dir, "train")
    assert [len(shard) for shard in shards] == expected
    assert os.path.exists(os.path.join(config.output_dir, record_schema.shard_name("train", 0, len(expected))))
    assert sorted(sum(shards, [])) == list(range(sum(sizes))), "every record once"
    listed = {record_schema.shard_name("train", k, len(expected)): {
        "records": count, "bytes": os.path.getsize(os.path.join(config.output_dir, record_schema.shard_name(
            "train", k, len(expected))))} for k, count in enumerate(expected)}
    assert metadata["splits"] == {"train": {"products": sum(sizes), "images": sum(sizes), "shards": len(expected),
                                            record_schema.SHARD_FILES: listed}}


def test_the_id_list_is_the_records_in_shard_order(tmp_path):
    config = stage_config(tmp_path, num_shards=3, range_size=7)
    results = _ranges(config, [7] * 6) + _ranges(config, [7, 5], split="val", first_id=1000)
    _finalize(config, results, _index(54))
    for split in ("train", "val"):
        ids = np.load(os.path.join(config.output_dir, record_schema.product_ids_name(split)))
        assert ids.dtype == np.int64 and ids.tolist() == sum(_shard_ids(config.output_dir, split), [])


def test_every_shard_crosses_the_whole_input(tmp_path):
    """The ranges' records are dealt into every shard (beam_convert/mix.py), not cut in input order."""
    config = stage_config(tmp_path, num_shards=5, range_size=100)
    _finalize(config, _ranges(config, [100] * 8), _index(800))
    for shard in _shard_ids(config.output_dir, "train"):
        assert len({product_id // 100 for product_id in shard}) >= 6, shard  # range r holds ids [100 r, 100 r + 100)
        assert shard != sorted(shard), "not the input order"


def test_metadata_adds_up_the_ranges_and_the_index(tmp_path):
    config = stage_config(tmp_path)
    results = _ranges(config, [3, 2])
    results[0] = RangeResult(results[0].range_id, results[0].records, {"1": 2, "3": 1}, {"not_jpeg": 2}, 1, None,
                             results[0].buckets)
    metadata = _finalize(config, results, _index(8, seen=(300, 500), corrupt=1), inputs=("a.bson", "b.bson"))
    assert metadata["rejected"] == {"corrupt_bson": 1, "not_jpeg": 2} and metadata["rejected_total"] == 3
    assert metadata["images_per_product"] == {"1": 4, "3": 1}
    assert (metadata["too_many_images"], metadata["documents"], metadata["inputs"]) == (1, 8, ["a.bson", "b.bson"])
    assert (metadata["num_classes"], metadata["categories"]) == (2, "seen in the data")
    assert [(row["label"], row["category_id"]) for row in read_labels(config.output_dir)] == [("0", "300"), ("1", "500")]
    assert not os.path.exists(config.tmp_dir), "the job's temporary files go once metadata.json is written"


def test_labels_come_from_the_categories_file_when_one_is_given(tmp_path):
    config = stage_config(tmp_path, categories=(Category(7, "a", "b", "c, d"), Category(9)))
    metadata = _finalize(config, _ranges(config, [2]), _index(2, seen=(9,)))
    assert (metadata["num_classes"], metadata["categories"]) == (2, "file")
    assert read_labels(config.output_dir)[0] == {
        "label": "0", "category_id": "7", "category_level1": "a", "category_level2": "b", "category_level3": "c, d"}


def test_the_digest_table_counts_train_images_and_the_overlap_of_the_splits(tmp_path):
    config = stage_config(tmp_path)
    results = _ranges(config, [2])
    rows = np.array([(11, 500, SPLIT_CODES["train"]), (11, 500, SPLIT_CODES["train"]), (12, 600, SPLIT_CODES["train"]),
                     (11, 600, SPLIT_CODES["train"]), (12, 600, SPLIT_CODES["val"]), (13, 500, SPLIT_CODES["val"])],
                    DIGEST_ROW)
    digests = os.path.join(config.tmp_dir, "digests", f"{results[0].range_id}.npy")
    os.makedirs(os.path.dirname(digests))
    np.save(digests, rows)
    results[0] = RangeResult(results[0].range_id, results[0].records, {"1": 2}, {}, 0, digests, results[0].buckets)
    metadata = _finalize(config, results, _index(2))
    table = np.load(os.path.join(config.output_dir, record_schema.IMAGE_DIGESTS_FILE))
    assert list(zip(table["digest"].tolist(), table["category_id"].tolist(), table["count"].tolist())) == [
        (11, 500, 2), (11, 600, 1), (12, 600, 1)]
    assert metadata["split_overlap"] == {"train_distinct_images": 2, "val_distinct_images": 2, "images_on_both_sides": 1}
    assert metadata["image_digests"] == record_schema.IMAGE_DIGESTS_FILE


def test_the_rejection_reports_of_the_ranges_are_joined_in_order(tmp_path):
    config = stage_config(tmp_path)
    results = _ranges(config, [1, 1])
    for result, line in zip(results, (b'{"_id": 1}\n', b'{"_id": 2}\n')):
        os.makedirs(os.path.dirname(rejection_report(config.tmp_dir, result.range_id)), exist_ok=True)
        with open(rejection_report(config.tmp_dir, result.range_id), "wb") as f:
            f.write(line)
    _finalize(config, results, _index(2))
    with open(os.path.join(config.output_dir, record_schema.rejected_name())) as f:
        assert f.read() == '{"_id": 1}\n{"_id": 2}\n'


def test_no_product_at_all_fails_the_stage_naming_the_kept_rejection_report(tmp_path):
    config = stage_config(tmp_path)
    report = rejection_report(config.tmp_dir, "00000-000000000000000")
    os.makedirs(os.path.dirname(report))
    with open(report, "w") as f:
        f.write('{"reason": "not_jpeg"}\n{"reason": "not_jpeg"}\n')
    empty = RangeResult("00000-000000000000000", {}, {}, {"not_jpeg": 2}, 0)
    kept = os.path.join(config.tmp_dir, record_schema.rejected_name())
    with pytest.raises(Exception, match=f"a.bson: 0 products: every one of 3 documents was rejected "
                                        f"\\(not_jpeg 2, corrupt_bson 1\\), see {kept}"):
        _finalize(config, [empty], _index(3, corrupt=1), inputs=("a.bson",))
    assert not os.path.exists(os.path.join(config.output_dir, record_schema.METADATA_FILE))
    assert not glob.glob(os.path.join(config.output_dir, "*.tfrecord"))
    with open(kept) as f:
        assert f.read().count("not_jpeg") == 2


# --- on the sample's conversion ---------------------------------------------------------------------


@pytest.mark.slow  # the sample's conversion (a fixture shared with other files)
def test_each_split_lists_its_product_ids_in_record_order(sample_output):
    for split in ("train", "val"):
        ids = np.load(sample_output / record_schema.product_ids_name(split))
        assert ids.dtype == np.int64
        assert ids.tolist() == [r["product_id"] for r in read_records(sample_output, split)]


@pytest.mark.slow
def test_digest_table_holds_train_images(sample_output):
    table = np.load(os.path.join(sample_output, record_schema.IMAGE_DIGESTS_FILE))
    train = read_records(sample_output, "train")
    expected = collections.Counter(
        (record_schema.image_digest(image), r["category_id"]) for r in train for image in r["images"] if image)
    got = {(int(d), int(c)): int(n) for d, c, n in zip(table["digest"], table["category_id"], table["count"])}
    assert got == dict(expected)
