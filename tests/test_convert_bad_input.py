"""Each kind of bad input: a clear reason per product, every valid product still converted."""

import json
import os
import shutil

import bson
import pytest

from tests.convert_helpers import (
    CATEGORIES_CSV, bomb_jpeg, convert, convert_and_read_stderr, png_bytes, product, read_metadata,
    read_records, read_rejected, sample_jpegs, write_bson)

pytestmark = pytest.mark.slow  # converts (a Beam job or a subprocess): not in make test-fast

JPEGS = sample_jpegs()
GOOD_CATEGORY = 1000010653  # in category_names.csv
BAD_DOCUMENTS = {
    # _id: (document, expected reason)
    101: ({"_id": 101, "category_id": GOOD_CATEGORY}, "bad_imgs"),
    102: ({"_id": 102, "imgs": "not a list", "category_id": GOOD_CATEGORY}, "bad_imgs"),
    103: (product(103, []), "no_images"),
    104: (product(104, [JPEGS[0], png_bytes()]), "not_jpeg"),
    105: (product(105, [JPEGS[1][: len(JPEGS[1]) // 2]]), "truncated_jpeg"),
    106: (product(106, [os.urandom(5000)]), "not_jpeg"),
    107: (product(107, [bomb_jpeg(JPEGS[2])]), "image_too_large"),
    108: (product(108, [JPEGS[3]], category_id=None), "missing_category_id"),
    109: (product(109, [JPEGS[4]], category_id=123), "unknown_category_id"),
    110: ({"_id": 110, "imgs": [{"not_picture": 1}], "category_id": GOOD_CATEGORY}, "bad_picture"),
    111: ({"_id": "abc", "imgs": [{"picture": bson.Binary(JPEGS[5])}], "category_id": GOOD_CATEGORY}, "bad_id"),
}


def _valid(product_id, images=1):
    return product(product_id, JPEGS[product_id % 50 : product_id % 50 + images])


@pytest.fixture(scope="module")
def bad_file_output(tmp_path_factory):
    folder = tmp_path_factory.mktemp("bad")
    documents = [_valid(1), _valid(2, 2)]
    for product_id, (document, _) in BAD_DOCUMENTS.items():
        documents += [document, _valid(product_id + 100)]
    documents.append(product(300, JPEGS[10:15]))  # five images: keep four, count it
    documents.append(_valid(2))  # a duplicate _id: the first occurrence is kept
    offsets = write_bson(folder / "bad.bson", documents)
    out = folder / "out"
    assert convert(f"--input={folder / 'bad.bson'}", f"--output_dir={out}", f"--categories={CATEGORIES_CSV}",
                   "--val_fraction=0", "--range_size=4") == 0
    return out, documents, offsets


@pytest.mark.parametrize("product_id", sorted(BAD_DOCUMENTS))
def test_each_bad_product_is_rejected_with_its_reason(bad_file_output, product_id):
    out, documents, offsets = bad_file_output
    document, reason = BAD_DOCUMENTS[product_id]
    offset = offsets[next(i for i, d in enumerate(documents) if d is document)]
    (row,) = [r for r in read_rejected(out) if r["offset"] == offset]
    assert row["reason"] == reason
    assert row["_id"] == (product_id if isinstance(document["_id"], int) else None)
    assert row["source"].endswith("bad.bson") and row["detail"]


def test_every_valid_product_arrives(bad_file_output):
    out, documents, _ = bad_file_output
    expected = {1, 2, 300} | {product_id + 100 for product_id in BAD_DOCUMENTS}
    records = read_records(out, "train")
    assert sorted(r["product_id"] for r in records) == sorted(expected)
    record = next(r for r in records if r["product_id"] == 2)
    assert sum(record["mask"]) == 2, "the first occurrence of a duplicate _id is the one kept"


def test_too_many_images_keeps_the_first_ones_and_counts(bad_file_output):
    out, _, _ = bad_file_output
    record = next(r for r in read_records(out, "train") if r["product_id"] == 300)
    assert record["images"] == JPEGS[10:14] and record["mask"] == [1, 1, 1, 1]
    assert read_metadata(out)["too_many_images"] == 1


def test_duplicate_id_is_rejected_and_counts_add_up(bad_file_output):
    out, documents, offsets = bad_file_output
    rejected = read_rejected(out)
    (duplicate,) = [r for r in rejected if r["reason"] == "duplicate_id"]
    assert duplicate["_id"] == 2 and duplicate["offset"] == offsets[-1]
    metadata = read_metadata(out)
    assert sum(metadata["rejected"].values()) == len(rejected) == len(BAD_DOCUMENTS) + 1
    assert metadata["rejected"]["not_jpeg"] == 2
    assert metadata["splits"]["train"]["products"] + len(rejected) == len(documents)


def _corrupt_file(folder, corruption):
    documents = [bson.encode(_valid(i)) for i in range(1, 6)]
    if corruption == "truncated":
        documents[-1] = documents[-1][: len(documents[-1]) // 2]
        bad_index = 4
    else:  # a sound length prefix around bytes that are not BSON
        body = b"\x07garbage" + os.urandom(40)
        documents.insert(2, (len(body) + 5).to_bytes(4, "little") + body + b"\x00")
        bad_index = 2
    offsets = write_bson(folder / "corrupt.bson", documents)
    return offsets[bad_index], folder / "corrupt.bson"


@pytest.mark.parametrize("corruption", ["truncated", "invalid"])
def test_corrupt_bson_stops_the_job_naming_file_and_offset(tmp_path, capsys, corruption):
    offset, path = _corrupt_file(tmp_path, corruption)
    out = tmp_path / "out"
    assert convert(f"--input={path}", f"--output_dir={out}") == 1
    message = capsys.readouterr().err.strip().splitlines()[-1]
    assert str(path) in message and f"byte offset {offset}" in message
    assert not os.path.exists(out / "metadata.json")
    assert not list(out.glob("*.tfrecord"))


def test_skip_corrupt_reads_past_an_oversized_document_and_says_what_nothing_frames(tmp_path, capsys):
    """Issue 28 item 9: a document over 16 MiB dropped the rest of the file (296 products) while
    the summary said "rejected 2". Now it is one rejection, the garbage after it one line with its
    byte range and a line of the summary, and every other product is converted."""
    documents = [bson.encode(_valid(i)) for i in range(1, 9)]
    oversized = bson.encode(product(77, [JPEGS[0] + b"\0" * (16 * 1024 * 1024)]))
    garbage = b"\xff\xff\xff\x7f" + bytes(3000)
    path, out = tmp_path / "big.bson", tmp_path / "out"
    offsets = write_bson(path, documents[:2] + [oversized] + documents[2:5] + [garbage] + documents[5:])
    status, lines = convert_and_read_stderr(capsys, f"--input={path}", f"--output_dir={out}", "--skip_corrupt",
                                            "--val_fraction=0", "--range_size=3")
    assert status == 0, lines
    metadata = read_metadata(out)
    assert metadata["splits"]["train"]["products"] == 8 and metadata["rejected"] == {"corrupt_bson": 2}
    assert metadata["unframed_bson"] == {"bytes": len(garbage), "spans": 1, "estimated_documents": 1}
    assert lines[-2] == (f"beam_convert: {len(garbage):,} bytes of the input could not be framed as BSON documents "
                         "and were skipped (~1 document at the input's mean size, lost; not in the rejected count), "
                         f"see {out / 'rejected-00000-of-00001.jsonl'}")
    assert "train 8; rejected 2;" in lines[-1]
    rows = {row["offset"]: row for row in read_rejected_file(out / "rejected-00000-of-00001.jsonl")}
    assert rows[offsets[2]]["_id"] == 77 and "over BSON's 16 MiB limit" in rows[offsets[2]]["detail"]
    assert f"bytes {offsets[6]}-{offsets[7]} ({len(garbage):,} bytes) could not be framed" in rows[offsets[6]]["detail"]


# --- a conversion that writes no product is an error (issue 9, item 4) ---------------------------

def read_rejected_file(path) -> list[dict]:
    with open(path) as f:
        return [json.loads(line) for line in f]


def _assert_one_error_line(lines, expected_start):
    assert lines and lines[-1].startswith(expected_start), lines
    assert all(line.startswith("beam_convert: ") for line in lines), lines  # no traceback, no Beam log


def test_an_empty_bson_is_an_error_and_leaves_no_metadata(tmp_path, capsys):
    (tmp_path / "empty.bson").write_bytes(b"")
    out = tmp_path / "out"
    status, lines = convert_and_read_stderr(capsys, f"--input={tmp_path / 'empty.bson'}", f"--output_dir={out}")
    assert status == 1
    _assert_one_error_line(lines, f"beam_convert: error: {tmp_path / 'empty.bson'}: 0 products: "
                                  "the input has no document")
    assert not list(out.rglob("*")), "nothing to keep: no output, no temporary folder"


def _every_product_rejected(folder):
    documents = [product(1, [png_bytes()]), product(2, []), product(3, [JPEGS[0]], category_id=123)]
    write_bson(folder / "rejected.bson", documents)
    return folder / "rejected.bson"


def test_an_all_rejected_bson_is_an_error_and_keeps_its_rejection_report(tmp_path, capsys):
    path = _every_product_rejected(tmp_path)
    out = tmp_path / "out"
    status, lines = convert_and_read_stderr(capsys, f"--input={path}", f"--output_dir={out}",
                                            f"--categories={CATEGORIES_CSV}")
    assert status == 1
    _assert_one_error_line(lines, f"beam_convert: error: {path}: 0 products: every one of 3 documents was rejected")
    report = lines[-1].rsplit(", see ", 1)[1]
    assert report.startswith(f"{out}/_tmp-"), "kept with the finished ranges; output_dir gets nothing"
    assert sorted(r["reason"] for r in read_rejected_file(report)) == ["no_images", "not_jpeg", "unknown_category_id"]
    assert not (out / "metadata.json").exists() and not list(out.glob("*.tfrecord"))
    # The same command fails the same way, at once: the finished ranges were kept.
    status, lines = convert_and_read_stderr(capsys, f"--input={path}", f"--output_dir={out}",
                                            f"--categories={CATEGORIES_CSV}")
    assert status == 1 and "every one of 3 documents was rejected" in lines[-1]


def test_an_empty_overwrite_run_leaves_the_earlier_conversion_as_it_was(bad_file_output, tmp_path, capsys):
    earlier, _, _ = bad_file_output
    out = tmp_path / "out"
    shutil.copytree(earlier, out)
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    status, _ = convert_and_read_stderr(capsys, f"--input={_every_product_rejected(tmp_path)}", f"--output_dir={out}",
                                        f"--categories={CATEGORIES_CSV}", "--overwrite")
    assert status == 1
    assert {p.name: p.read_bytes() for p in out.iterdir() if not p.name.startswith("_tmp-")} == before


# --- a file is labelled or not as a whole (issue 20, item 2) ------------------------------------

def _mostly_unlabelled_file(folder, stray_at=57):
    """200 unlabelled products, one of which carries a category_id."""
    documents = [product(1000 + n, [JPEGS[n % len(JPEGS)]], category_id=GOOD_CATEGORY if n == stray_at else None)
                 for n in range(200)]
    offsets = write_bson(folder / "test.bson", documents)
    return folder / "test.bson", documents, offsets


def test_a_stray_category_id_in_an_unlabelled_file_is_rejected_not_taken_as_labels(tmp_path, capsys):
    path, documents, offsets = _mostly_unlabelled_file(tmp_path)
    out = tmp_path / "out"
    status, lines = convert_and_read_stderr(capsys, f"--input={path}", f"--output_dir={out}")
    assert status == 0, lines
    metadata = read_metadata(out)
    assert metadata["splits"].keys() == {"test"} and metadata["splits"]["test"]["products"] == 199
    assert metadata["labelled_inputs"] == []
    assert metadata["rejected"] == {"unexpected_category_id": 1}
    (row,) = read_rejected(out)
    assert (row["_id"], row["offset"], row["reason"]) == (1057, offsets[57], "unexpected_category_id")
    assert sorted(r["product_id"] for r in read_records(out, "test")) == [
        d["_id"] for d in documents if d["_id"] != 1057]  # ids ascend in the input
    assert metadata["num_classes"] == 0, "the stray category is not a class"
    assert (f"beam_convert: 1 document with a category_id in unlabelled input was rejected "
            f"(unexpected_category_id), see {out}/rejected-00000-of-00001.jsonl") in lines
    assert lines[-1].startswith("beam_convert: done in ") and "test 199; rejected 1;" in lines[-1]


def test_a_labelled_file_with_a_few_unlabelled_documents_stays_labelled(tmp_path):
    documents = [product(1000 + n, [JPEGS[n % len(JPEGS)]], category_id=None if n % 50 == 0 else GOOD_CATEGORY)
                 for n in range(200)]
    write_bson(tmp_path / "train.bson", documents)
    out = tmp_path / "out"
    assert convert(f"--input={tmp_path / 'train.bson'}", f"--output_dir={out}", "--val_fraction=0") == 0
    metadata = read_metadata(out)
    assert metadata["splits"]["train"]["products"] == 196 and metadata["rejected"] == {"missing_category_id": 4}
