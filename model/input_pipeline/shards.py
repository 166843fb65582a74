"""A split's TFRecord shards, checked before a long read: the whole set present, each file's size
against metadata.json's list (or, asked or for an earlier conversion, every record read), and the
count against metadata.json, so that no metric or submission is computed on fewer products than
the data folder holds without saying so.

TensorFlow's reader names no file when a record is damaged ("corrupted record at 29476"), and it
cannot resynchronise after one: the rest of that file is lost to it. So damage is located file by
file here (a file of the wrong size is read; damage that keeps the size is met when the split is
read, and the reader's caller reads every record to name the file), and `--skip_corrupt_records`
skips the rest of each damaged file, counted.
"""

from __future__ import annotations

import dataclasses
import os
import re

import tensorflow as tf

import record_schema
from model import signals
from model.errors import UserError
from model.input_pipeline import data_folder

_SHARD_NAME = re.compile(r"^(?P<split>.+)-(?P<index>\d{5})-of-(?P<count>\d{5})\.tfrecord$")


@dataclasses.dataclass(frozen=True)
class SplitCheck:
    files: tuple[str, ...]
    records: int  # readable records in all the files
    expected: int  # products of the split in metadata.json
    damaged: dict  # file -> what TensorFlow reported (the byte offset of the damage)
    records_per_file: dict  # file -> its readable records (where a training stream's passes end)

    @property
    def unreadable(self) -> int:
        """Records lost to damage: the metadata's count less what can be read."""
        return max(0, self.expected - self.records)


def missing_shards(files: list[str]) -> list[str]:
    """Names of the shards that the `-of-N` in the files' names promise but that are absent."""
    present = {}
    for path in files:
        match = _SHARD_NAME.match(os.path.basename(path))
        if match:
            present.setdefault((match["split"], int(match["count"])), set()).add(int(match["index"]))
    return [f"{split}-{index:05d}-of-{count:05d}.tfrecord"
            for (split, count), indices in sorted(present.items())
            for index in range(count) if index not in indices]


def count_records(path: str) -> tuple[int, str | None]:
    """(records readable from the start of the file, TensorFlow's message at the first damage or None)."""
    records = tf.data.TFRecordDataset(path, buffer_size=8 << 20)
    try:
        return int(records.reduce(0, lambda count, _: count + 1)), None
    except tf.errors.DataLossError as error:
        readable = int(records.ignore_errors().reduce(0, lambda count, _: count + 1))
        return readable, _tensorflow_message(error)


def _tensorflow_message(error: tf.errors.OpError) -> str:
    # "{{function_node ...}} corrupted record at 29476 [Op:IteratorGetNext] name: " -> the middle.
    text = re.sub(r"\{\{function_node [^}]*\}\}\s*", "", error.message)
    return re.sub(r"\s*\[Op:[^\]]*\].*$", "", text, flags=re.S).strip().replace("'", "")


def check_split(data_dir: str, split: str, *, skip_corrupt_records: bool, verify_records: bool = False,
                log=print) -> SplitCheck:
    """Checks one split before it is read; a problem the user must see stops here with one line.

    Missing shards always stop (nothing can stand in for a file). The shards are then checked
    against metadata.json's list of their record counts and sizes (record_schema.SHARD_FILES), one
    stat a file and no record read; only a file of another size is read, to name its damage. With
    verify_records, with skip_corrupt_records (damage that keeps a file's size would otherwise be
    skipped unnamed, and the file's record count, which sets the epoch and the resume position,
    be wrong), or for a folder converted before the list was kept, every record is read. A
    damaged shard stops unless skip_corrupt_records, in which case each damaged file is named once.
    Fewer readable records than metadata.json counts, with no damage to explain it, stops too (a
    shard cut at a record boundary, or one from another conversion).
    """
    pattern = data_folder.split_pattern(data_dir, split)
    files = tuple(sorted(tf.io.gfile.glob(pattern)))
    if not files:
        raise UserError(f"no {split} shards in {data_dir} (looked for {os.path.basename(pattern)})")
    missing = missing_shards(list(files))
    if missing:
        raise UserError(f"{data_dir}: {len(missing)} {split} shard(s) missing: {', '.join(missing[:5])}"
                            + (" ..." if len(missing) > 5 else ""))
    metadata = data_folder.read_metadata(data_dir)
    expected = data_folder.split_products(metadata, split)
    listed = metadata.get("splits", {}).get(split, {}).get(record_schema.SHARD_FILES)
    read_all = verify_records or skip_corrupt_records
    if listed is None and not read_all:
        log(f"{data_dir}: converted before shard sizes were recorded: reading every {split} record to check "
            "the shards (convert again to skip this)")
    damaged, per_file = {}, {}
    for path in files:
        signals.raise_if_requested()  # a split of 700 files on a bucket takes a while
        if read_all or listed is None:
            per_file[path] = _read_file(path, skip_corrupt_records, damaged, log)
        else:
            per_file[path] = _file_as_listed(data_dir, split, path, listed, skip_corrupt_records, damaged, log)
    records = sum(per_file.values())
    check = SplitCheck(files, records, expected, damaged, per_file)
    if records < expected and not damaged:
        raise UserError(f"{data_dir}: the {split} shards hold {records} records, metadata.json counts {expected}: "
                            "a shard was cut short or replaced; convert again")
    if records > expected:
        raise UserError(f"{data_dir}: the {split} shards hold {records} records, metadata.json counts only "
                            f"{expected}: shards of another conversion are mixed in")
    return check


def _read_file(path: str, skip_corrupt_records: bool, damaged: dict, log) -> int:
    """Reads every record of one shard: its readable records; damage stops, or is named and noted."""
    readable, problem = count_records(path)
    if problem is not None:
        damaged[path] = problem
        if not skip_corrupt_records:
            raise UserError(f"{path}: {problem}; pass --skip_corrupt_records to read the rest of the data")
        log(f"Skipping the rest of {path} after {readable} records: {problem}")
    return readable


def _file_as_listed(data_dir: str, split: str, path: str, listed: dict, skip_corrupt_records: bool,
                    damaged: dict, log) -> int:
    """One shard's records as metadata.json lists them, if its size is the listed one (one stat);
    a file of another size is read, and named."""
    entry = listed.get(os.path.basename(path))
    if entry is None:
        raise UserError(f"{path}: not among the {len(listed)} {split} shards metadata.json lists: shards of "
                        "another conversion are mixed in; convert again")
    size = tf.io.gfile.stat(path).length
    if size == entry["bytes"]:
        return int(entry["records"])
    readable = _read_file(path, skip_corrupt_records, damaged, log)
    if path not in damaged:  # well-formed records, but not the ones converted
        raise UserError(f"{path}: {size} bytes holding {readable} records, metadata.json lists {entry['bytes']} "
                        f"bytes and {entry['records']} records: the shard was cut short or replaced; convert again")
    return readable
