"""The index stage (beam_convert/index.py, IndexFiles) in a TestPipeline: the ranges of each file,
the dataset index, and corrupt framing, on BSON files written here."""

import json
import os

import bson
import pytest
from apache_beam.testing.util import assert_that, equal_to

from beam_convert.index import IndexFiles
from beam_convert.job import DatasetIndex, IndexRange, UnframedBson, progress_marker, rejection_report
from tests.convert_helpers import counters, product, sample_jpegs, stage_config, stage_pipeline, write_bson

JPEGS = sample_jpegs()


def _index(tmp_path, paths, ranges=None, index=None, **fields) -> dict[str, int]:
    """Runs IndexFiles alone, checking its ranges and its dataset index against those given (if
    given); returns the job's counters."""
    config = stage_config(tmp_path, **fields)
    with stage_pipeline() as pipeline:
        found_ranges, dataset_index = pipeline | IndexFiles([str(path) for path in paths], config)
        if ranges is not None:
            assert_that(found_ranges, equal_to(ranges), label="CheckRanges")
        if index is not None:
            assert_that(dataset_index, equal_to([index]), label="CheckIndex")
    return counters(pipeline.result)


def test_each_file_is_cut_into_ranges_of_range_size_documents_numbered_by_its_place_in_the_input(tmp_path):
    labelled = [product(10 + n, [JPEGS[n]], category_id=1000 + n % 2) for n in range(5)]
    unlabelled = [product(20 + n, [JPEGS[n]], category_id=None) for n in range(3)]
    a, b = tmp_path / "a.bson", tmp_path / "b.bson"
    a_offsets, b_offsets = write_bson(a, labelled), write_bson(b, unlabelled)
    a_end, b_end = a.stat().st_size, b.stat().st_size
    ranges = [
        IndexRange(str(a), 0, a_offsets[0], a_offsets[2], 2, True),
        IndexRange(str(a), 0, a_offsets[2], a_offsets[4], 2, True),
        IndexRange(str(a), 0, a_offsets[4], a_end, 1, True),
        IndexRange(str(b), 1, b_offsets[0], b_offsets[2], 2, False),
        IndexRange(str(b), 1, b_offsets[2], b_end, 1, False),
    ]
    _index(tmp_path, [a, b], ranges, range_size=2)
    assert len({index_range.range_id for index_range in ranges}) == 5, "a range's files are named by its id"


def test_the_dataset_index_knows_the_labelled_files_their_categories_and_which_repeated_id_is_kept(tmp_path):
    a, b = tmp_path / "a.bson", tmp_path / "b.bson"
    a_offsets = write_bson(a, [product(1, [JPEGS[0]], 1003), product(2, [JPEGS[1]], 1001), product(2, [JPEGS[2]], 1001)])
    write_bson(b, [product(2, [JPEGS[3]], None), product(3, [JPEGS[4]], None), product(1, [JPEGS[5]], None)])
    index = DatasetIndex(labelled_files=frozenset({str(a)}), category_ids_seen=(1001, 1003),
                         duplicate_keepers={1: (0, a_offsets[0]), 2: (0, a_offsets[1])}, documents=6,
                         corrupt_rejections=0)
    _index(tmp_path, [a, b], index=index, range_size=10)
    with open(progress_marker(stage_config(tmp_path).tmp_dir, "index", "00001")) as f:
        assert json.load(f) == {"path": str(b), "documents": 3}  # what the terminal's progress adds up


def test_a_labelled_file_with_a_stray_unlabelled_document_stays_labelled_and_the_reverse(tmp_path):
    mostly_labelled = [product(n, [JPEGS[n]], None if n == 0 else 1000) for n in range(4)]
    mostly_unlabelled = [product(10 + n, [JPEGS[n]], 1000 if n == 0 else None) for n in range(4)]
    a, b = tmp_path / "a.bson", tmp_path / "b.bson"
    write_bson(a, mostly_labelled)
    write_bson(b, mostly_unlabelled)
    ranges = [IndexRange(str(a), 0, 0, a.stat().st_size, 4, True), IndexRange(str(b), 1, 0, b.stat().st_size, 4, False)]
    _index(tmp_path, [a, b], ranges, DatasetIndex(frozenset({str(a)}), (1000,), {}, 8, 0))


def _truncated_file(path):
    documents = [bson.encode(product(n, [JPEGS[n]])) for n in range(5)]
    documents[-1] = documents[-1][: len(documents[-1]) // 2]
    return write_bson(path, documents)


def test_corrupt_framing_fails_the_stage_naming_the_file_and_the_byte_offset(tmp_path):
    offsets = _truncated_file(tmp_path / "truncated.bson")
    with pytest.raises(Exception, match=f"{tmp_path / 'truncated.bson'}: corrupt BSON document at byte offset "
                                        f"{offsets[-1]}: truncated"):
        _index(tmp_path, [tmp_path / "truncated.bson"])


def test_skip_corrupt_indexes_up_to_the_break_and_reports_the_rest_of_the_file(tmp_path):
    path = tmp_path / "truncated.bson"
    offsets = _truncated_file(path)
    ranges = [IndexRange(str(path), 0, offsets[0], offsets[3], 3, True),
              IndexRange(str(path), 0, offsets[3], offsets[4], 1, True)]
    lost = path.stat().st_size - offsets[-1]  # the half document nothing frames
    index = DatasetIndex(frozenset({str(path)}), (1000010653,), {}, documents=4, corrupt_rejections=1,
                         unframed=UnframedBson(lost, 1, offsets[-1]))
    counted = _index(tmp_path, [path], ranges, index, skip_corrupt=True, range_size=3)
    assert counted == {"corrupt_bson": 1}
    with open(rejection_report(stage_config(tmp_path).tmp_dir, "00000-index")) as f:
        (row,) = [json.loads(line) for line in f]
    assert (row["_id"], row["source"], row["offset"], row["reason"]) == (None, str(path), offsets[-1], "corrupt_bson")
    assert row["detail"].endswith("rest of file skipped")


def _oversized(product_id):
    """A whole document over BSON's 16 MiB limit (mongod refuses them; a dump may not)."""
    return bson.encode(product(product_id, [JPEGS[0] + b"\0" * (16 * 1024 * 1024)]))


def _rejections(tmp_path) -> list[dict]:
    with open(rejection_report(stage_config(tmp_path).tmp_dir, "00000-index")) as f:
        return [json.loads(line) for line in f]


def test_skip_corrupt_reads_past_a_document_over_16_mib_as_one_product(tmp_path):
    """Issue 28 item 9: the rest of the file was dropped ("rest of file skipped") and counted as
    one rejection. The document is one rejection with its _id; every range after it converts."""
    path = tmp_path / "big.bson"
    documents = [bson.encode(product(n, [JPEGS[n]])) for n in range(5)]
    offsets = write_bson(path, documents[:2] + [_oversized(99)] + documents[2:])
    ranges = [IndexRange(str(path), 0, offsets[0], offsets[2], 2, True),
              IndexRange(str(path), 0, offsets[3], offsets[5], 2, True),  # a range starts after the skipped span
              IndexRange(str(path), 0, offsets[5], path.stat().st_size, 1, True)]
    index = DatasetIndex(frozenset({str(path)}), (1000010653,), {}, documents=5, corrupt_rejections=1)
    assert _index(tmp_path, [path], ranges, index, skip_corrupt=True, range_size=2) == {"corrupt_bson": 1}
    (row,) = _rejections(tmp_path)
    assert (row["_id"], row["offset"], row["reason"]) == (99, offsets[2], "corrupt_bson")
    assert f"one whole document of {offsets[3] - offsets[2]:,} bytes, over BSON's 16 MiB limit" in row["detail"]


def test_skip_corrupt_resyncs_at_the_next_document_after_bytes_nothing_frames(tmp_path):
    """A broken length prefix, then bytes that are no document: skipped in one line naming their
    byte range, counted in DatasetIndex.unframed; the documents after them are indexed."""
    path = tmp_path / "garbage.bson"
    documents = [bson.encode(product(n, [JPEGS[n]])) for n in range(4)]
    broken = b"\xff\xff\xff\x7f" + documents[1][4:] + bytes(5000)  # a document's body and zeros
    offsets = write_bson(path, documents[:1] + [broken] + documents[2:])
    ranges = [IndexRange(str(path), 0, offsets[0], offsets[1], 1, True),
              IndexRange(str(path), 0, offsets[2], path.stat().st_size, 2, True)]
    framed = path.stat().st_size - len(broken)
    index = DatasetIndex(frozenset({str(path)}), (1000010653,), {}, documents=3, corrupt_rejections=1,
                         unframed=UnframedBson(len(broken), 1, framed))
    _index(tmp_path, [path], ranges, index, skip_corrupt=True, range_size=10)
    (row,) = _rejections(tmp_path)
    assert row["offset"] == offsets[1] and row["detail"] == (
        f"impossible document length 2147483647; bytes {offsets[1]}-{offsets[2]} ({len(broken):,} bytes) could not "
        f"be framed, the documents in them are lost; reading on from the next document, at byte {offsets[2]}")
    assert index.unframed.estimated_documents(3) == round(len(broken) * 3 / framed)


def test_an_empty_file_gives_no_range(tmp_path):
    (tmp_path / "empty.bson").write_bytes(b"")
    _index(tmp_path, [tmp_path / "empty.bson"], [], DatasetIndex(frozenset(), (), {}, 0, 0))
    assert os.listdir(tmp_path / "out" / "_tmp-test" / "progress") == ["index-00000.json"]
