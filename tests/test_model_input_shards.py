"""model/input_pipeline/shards.py on its own: missing_shards on names, count_records on intact and
damaged files, and check_split's one-line stops (missing, short, damaged, mixed-in shards) or its
count of what --skip_corrupt_records skips. The data folder is record_helpers' (82 real products,
3 shards a split: train 22 + 22 + 21, val 6 + 6 + 5); one train shard is damaged in a copy.

test_model_data_faults runs the same faults through evaluate and train.py with a trained model."""

import json
import os
import re
import shutil

import pytest
import tensorflow as tf

import record_schema
from model.errors import UserError
from model.input_pipeline import shards
from tests.record_helpers import write_data_dir

SHARD_RECORDS = [22, 22, 21]  # train, round-robin over 3 shards


# ---------------------------------------------------------------------------------------------
# missing_shards


@pytest.mark.parametrize("files, missing", [
    ([], []),
    (["/d/train-00000-of-00001.tfrecord"], []),
    (["gs://b/d/train-00002-of-00003.tfrecord"], ["train-00000-of-00003.tfrecord", "train-00001-of-00003.tfrecord"]),
    # Each split against its own count, splits in order.
    (["/d/val-00000-of-00002.tfrecord", "/d/train-00001-of-00002.tfrecord"],
     ["train-00000-of-00002.tfrecord", "val-00001-of-00002.tfrecord"]),
    # Shards of two conversions (another -of-N) are two sets: each is checked whole.
    (["/d/train-00000-of-00002.tfrecord", "/d/train-00001-of-00002.tfrecord", "/d/train-00000-of-00003.tfrecord"],
     ["train-00001-of-00003.tfrecord", "train-00002-of-00003.tfrecord"]),
    # A split name with dashes; files not named like shards are no promise.
    (["/d/my-test-00001-of-00002.tfrecord", "/d/notes.txt", "/d/train-1-of-2.tfrecord"], ["my-test-00000-of-00002.tfrecord"]),
])
def test_missing_shards(files, missing):
    assert shards.missing_shards(files) == missing


# ---------------------------------------------------------------------------------------------
# Damage


def record_starts(path) -> list[int]:
    """Byte offsets of a TFRecord file's records (length 8, its CRC 4, data, data CRC 4)."""
    data, starts, offset = open(path, "rb").read(), [], 0
    while offset < len(data):
        starts.append(offset)
        offset += 16 + int.from_bytes(data[offset:offset + 8], "little")
    return starts


def damage(path, kind) -> tuple[int, int]:
    """Damages a shard in place: "truncate" (cut in the middle of a record), "flip" (a byte of a
    record's data changed), "boundary" (cut after the first record: well-formed, short) or
    "delete". Returns (records still readable, offset of the damaged record)."""
    data = open(path, "rb").read()
    starts = record_starts(path)
    middle = len(data) // 2
    hit = max(i for i, start in enumerate(starts) if start + 12 <= middle)  # the record whose data holds it
    if kind == "delete":
        os.remove(path)
        return 0, 0
    if kind == "boundary":
        open(path, "wb").write(data[:starts[1]])
        return 1, 0
    if kind == "truncate":
        open(path, "wb").write(data[:middle])
    elif kind == "flip":
        broken = bytearray(data)
        broken[middle] ^= 0xFF
        open(path, "wb").write(bytes(broken))
    return hit, starts[hit]


@pytest.fixture(scope="module")
def source(tmp_path_factory):
    return write_data_dir(str(tmp_path_factory.mktemp("shards") / "data"), shards=3)


@pytest.fixture
def data(source, tmp_path):
    """A copy of the data folder to damage, and its second train shard."""
    copy = str(tmp_path / "data")
    shutil.copytree(source, copy)
    return copy, os.path.join(copy, record_schema.shard_name("train", 1, 3))


# TensorFlow's words after the offset vary ("truncated record at 77836 failed with Read less bytes
# than requested"): the message must start with the kind and the record's offset, on one line,
# with none of the op names and quotes around it.
MESSAGE = {"truncate": r"truncated record at {offset}( failed with [^\n\['{{}}]*)?", "flip": r"corrupted record at {offset}"}


def assert_problem(problem, kind, offset):
    assert re.fullmatch(MESSAGE[kind].format(offset=offset), problem), problem


def test_count_records_of_an_intact_and_an_empty_file(data, tmp_path):
    _, path = data
    assert shards.count_records(path) == (22, None)
    empty = tmp_path / "empty.tfrecord"
    empty.write_bytes(b"")
    assert shards.count_records(str(empty)) == (0, None)


@pytest.mark.parametrize("kind", ["truncate", "flip"])
def test_count_records_of_a_damaged_file(data, kind):
    _, path = data
    readable, offset = damage(path, kind)
    assert 0 < readable < 22  # the damage is in the middle
    count, problem = shards.count_records(path)
    assert count == readable
    assert_problem(problem, kind, offset + (12 if kind == "flip" else 0))


@pytest.mark.parametrize("message, line", [
    ("{{function_node __wrapped__IteratorGetNext_output_types_1_device_/job:localhost/replica:0/task:0/device:CPU:0}} "
     "corrupted record at 29476 [Op:IteratorGetNext] name: ", "corrupted record at 29476"),
    ("truncated record at 77836' failed with Read less bytes than requested [Op:ReduceDataset]\nname: x",
     "truncated record at 77836 failed with Read less bytes than requested"),
    ("corrupted record at 5", "corrupted record at 5"),
])
def test_tensorflow_message_is_cut_to_one_line(message, line):
    assert shards._tensorflow_message(tf.errors.DataLossError(None, None, message)) == line


# ---------------------------------------------------------------------------------------------
# check_split


def test_an_intact_split(data):
    folder, _ = data
    logged = []
    check = shards.check_split(folder, "train", skip_corrupt_records=False, log=logged.append)
    files = tuple(os.path.join(folder, record_schema.shard_name("train", i, 3)) for i in range(3))
    # write_data_dir deals the 65 records round-robin: 22, 22, 21.
    assert check == shards.SplitCheck(files=files, records=65, expected=65, damaged={},
                                      records_per_file=dict(zip(files, (22, 22, 21))))
    assert check.unreadable == 0 and logged == []
    assert shards.check_split(folder, "val", skip_corrupt_records=False).records == 17


@pytest.mark.parametrize("kind, skip, message", [
    ("delete", False, "{folder}: 1 train shard(s) missing: train-00001-of-00003.tfrecord"),
    ("delete", True, "{folder}: 1 train shard(s) missing: train-00001-of-00003.tfrecord"),  # nothing stands in
    # By the sizes metadata.json lists, the cut file is named; reading every record counts the split.
    ("boundary", False, "{path}: {size} bytes holding 1 records, metadata.json lists {listed} bytes and 22 "
                        "records: the shard was cut short or replaced; convert again"),
    # --skip_corrupt_records reads every record (a file's exact count sets the epoch and the resume).
    ("boundary", True, "{folder}: the train shards hold 44 records, metadata.json counts 65: "
                       "a shard was cut short or replaced; convert again"),
    ("boundary", "verify", "{folder}: the train shards hold 44 records, metadata.json counts 65: "
                           "a shard was cut short or replaced; convert again"),
    ("truncate", False, "{path}: {problem}; pass --skip_corrupt_records to read the rest of the data"),
    ("flip", "verify", "{path}: {problem}; pass --skip_corrupt_records to read the rest of the data"),
])
def test_check_split_stops_with_one_line(data, kind, skip, message):
    folder, path = data
    listed = os.path.getsize(path)
    damage(path, kind)
    size = os.path.getsize(path) if os.path.exists(path) else 0
    problem = shards.count_records(path)[1] if kind in MESSAGE else None
    with pytest.raises(UserError) as stopped:
        shards.check_split(folder, "train", skip_corrupt_records=skip is True, verify_records=skip == "verify",
                           log=pytest.fail)
    assert str(stopped.value) == message.format(folder=folder, path=path, problem=problem,
                                                size=size, listed=listed)
    assert "\n" not in str(stopped.value)


@pytest.mark.parametrize("kind", ["truncate", "flip"])
def test_check_split_skips_the_rest_of_a_damaged_shard_and_counts_it(data, kind):
    """A cut file is found by its size, damage of the same size by reading every record."""
    folder, path = data
    readable, offset = damage(path, kind)
    logged = []
    check = shards.check_split(folder, "train", skip_corrupt_records=True, verify_records=kind == "flip",
                               log=logged.append)
    [problem] = check.damaged.values()
    assert list(check.damaged) == [path]
    assert_problem(problem, kind, offset + (12 if kind == "flip" else 0))
    assert check.records == 22 + readable + 21 and check.expected == 65
    assert check.unreadable == 22 - readable
    assert logged == [f"Skipping the rest of {path} after {readable} records: {problem}"]


def test_check_split_names_every_damaged_shard_once(data):
    folder, path = data
    other = os.path.join(folder, record_schema.shard_name("train", 2, 3))
    first, _ = damage(path, "truncate")
    second, _ = damage(other, "flip")
    logged = []
    check = shards.check_split(folder, "train", skip_corrupt_records=True, verify_records=True, log=logged.append)
    assert list(check.damaged) == [path, other]
    assert [line.split(" after ")[0] for line in logged] == [f"Skipping the rest of {path}",
                                                             f"Skipping the rest of {other}"]
    assert check.records == 22 + first + second


def test_check_split_with_more_records_than_metadata(data):
    folder, _ = data
    metadata_path = os.path.join(folder, record_schema.METADATA_FILE)
    metadata = json.load(open(metadata_path))
    metadata["splits"]["train"]["products"] = 60
    json.dump(metadata, open(metadata_path, "w"))
    with pytest.raises(UserError) as stopped:
        shards.check_split(folder, "train", skip_corrupt_records=False)
    assert str(stopped.value) == (f"{folder}: the train shards hold 65 records, metadata.json counts only 60: "
                                  "shards of another conversion are mixed in")


def test_check_split_of_a_split_with_no_shards(data):
    folder, _ = data
    with pytest.raises(UserError) as stopped:
        shards.check_split(folder, "test", skip_corrupt_records=True)
    assert str(stopped.value) == f"no test shards in {folder} (looked for test-*-of-*.tfrecord)"


def test_check_split_names_the_first_five_missing_shards(tmp_path):
    for index in (0, 7):  # 1-6 of 8 missing; nothing is read before the names are checked
        (tmp_path / record_schema.shard_name("train", index, 8)).write_bytes(b"")
    with pytest.raises(UserError) as stopped:
        shards.check_split(str(tmp_path), "train", skip_corrupt_records=False)
    names = ", ".join(record_schema.shard_name("train", i, 8) for i in range(1, 6))
    assert str(stopped.value) == f"{tmp_path}: 6 train shard(s) missing: {names} ..."


# ---------------------------------------------------------------------------------------------
# By listing and size (metadata.json's shard_files), or every record read


@pytest.fixture
def reads(monkeypatch):
    """The shards check_split reads whole, in order."""
    read, count = [], shards.count_records
    monkeypatch.setattr(shards, "count_records", lambda path: read.append(path) or count(path))
    return read


def test_a_converted_split_is_checked_without_reading_a_record(data, reads, monkeypatch):
    folder, _ = data
    monkeypatch.setattr(tf.data, "TFRecordDataset", lambda *_, **__: pytest.fail("a record was read"))
    check = shards.check_split(folder, "train", skip_corrupt_records=False, log=pytest.fail)
    assert reads == []
    assert check.records == 65 and list(check.records_per_file.values()) == SHARD_RECORDS and check.damaged == {}


def test_a_cut_shard_is_found_by_its_size_and_only_it_is_read_to_name_its_damage(data, reads):
    folder, path = data
    _, offset = damage(path, "truncate")
    with pytest.raises(UserError, match=rf"^{re.escape(path)}: truncated record at {offset}"):
        shards.check_split(folder, "train", skip_corrupt_records=False, log=pytest.fail)
    assert reads == [path]


def test_skip_corrupt_records_reads_every_record_and_names_the_damaged_file(data, reads):
    """Damage that keeps a file's size (a flipped byte) is invisible to the size check: skipped
    unnamed, the file's listed count would set a wrong epoch length and resume position."""
    folder, path = data
    readable, offset = damage(path, "truncate")
    logged = []
    check = shards.check_split(folder, "train", skip_corrupt_records=True, log=logged.append)
    assert len(reads) == 3
    [line] = logged
    assert re.fullmatch(rf"Skipping the rest of {re.escape(path)} after {readable} records: truncated record at "
                        rf"{offset}.*", line)
    assert check.records_per_file[path] == readable and check.records == 22 + readable + 21


def test_a_folder_converted_before_shard_sizes_were_recorded_is_read_whole_with_one_line(data, reads):
    folder, _ = data
    metadata_path = os.path.join(folder, record_schema.METADATA_FILE)
    metadata = json.load(open(metadata_path))
    for totals in metadata["splits"].values():
        del totals[record_schema.SHARD_FILES]
    json.dump(metadata, open(metadata_path, "w"))
    logged = []
    check = shards.check_split(folder, "train", skip_corrupt_records=False, log=logged.append)
    assert logged == [f"{folder}: converted before shard sizes were recorded: reading every train record to check "
                      "the shards (convert again to skip this)"]
    assert len(reads) == 3 and list(check.records_per_file.values()) == SHARD_RECORDS


def test_verify_records_reads_every_record(data, reads):
    folder, _ = data
    check = shards.check_split(folder, "train", skip_corrupt_records=False, verify_records=True, log=pytest.fail)
    assert reads == list(check.files) and list(check.records_per_file.values()) == SHARD_RECORDS

