"""Helpers for the conversion tests: BSON documents on disk, and reading the job's output back."""

import collections
import csv
import glob
import io
import json
import os
import pathlib
import signal
import subprocess
import sys

import bson
import tensorflow as tf
from PIL import Image

import record_schema
from beam_convert.__main__ import main

REPO = pathlib.Path(__file__).resolve().parent.parent
SAMPLE_BSON = REPO / "data" / "train_example.bson"
CATEGORIES_CSV = REPO / "data" / "category_names.csv"


def sample_documents() -> list[dict]:
    with open(SAMPLE_BSON, "rb") as f:
        return list(bson.decode_file_iter(f))


def sample_jpegs() -> list[bytes]:
    return [img["picture"] for doc in sample_documents() for img in doc["imgs"]]


def png_bytes() -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (180, 180), (200, 10, 10)).save(out, "PNG")
    return out.getvalue()


def bomb_jpeg(jpeg: bytes) -> bytes:
    """A real JPEG whose frame header claims 60000 x 60000 pixels."""
    data = bytearray(jpeg)
    sof = data.find(b"\xff\xc0")
    data[sof + 5 : sof + 9] = (60000).to_bytes(2, "big") * 2
    return bytes(data)


def product(product_id, pictures, category_id=1000010653):
    doc = {"_id": product_id, "imgs": [{"picture": bson.Binary(p)} for p in pictures]}
    if category_id is not None:
        doc["category_id"] = category_id
    return doc


def write_bson(path, documents) -> list[int]:
    """Writes documents (dicts or raw bytes); returns each one's byte offset."""
    offsets = []
    with open(path, "wb") as f:
        for doc in documents:
            offsets.append(f.tell())
            f.write(doc if isinstance(doc, bytes) else bson.encode(doc))
    return offsets


def convert(*args: str) -> int:
    return main([str(a) for a in args])


def convert_and_read_stderr(capsys, *args: str) -> tuple[int, list[str]]:
    """Exit status and stderr lines of an in-process run; argparse's own exits count as statuses."""
    capsys.readouterr()
    try:
        status = convert(*args)
    except SystemExit as exit_:
        status = exit_.code
    return status, capsys.readouterr().err.splitlines()


def start_command(*args: str) -> subprocess.Popen:
    """`python -m beam_convert ARGS` started in its own process group (its Beam workers join it)."""
    return subprocess.Popen([sys.executable, "-m", "beam_convert", *map(str, args)], cwd=REPO, text=True,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, start_new_session=True)


def finish_command(process: subprocess.Popen, timeout: float) -> subprocess.CompletedProcess:
    """Waits for a start_command process; past the timeout, kills its process group (worker
    processes included: a hung run must not outlive the test) and raises TimeoutExpired."""
    try:
        stdout, stderr = process.communicate(timeout=timeout)
    except subprocess.TimeoutExpired:
        kill_group(process)
        raise
    return subprocess.CompletedProcess(process.args, process.returncode, stdout, stderr)


def kill_group(process: subprocess.Popen) -> None:
    try:
        os.killpg(process.pid, signal.SIGKILL)  # the group start_command made: this process and its workers
    except ProcessLookupError:
        pass
    process.communicate()


def run_command(*args: str, timeout: float = 300) -> subprocess.CompletedProcess:
    """`python -m beam_convert ARGS` in its own process, as a user runs it."""
    return finish_command(start_command(*args), timeout)


def read_records(output_dir, split) -> list[dict]:
    paths = sorted(glob.glob(os.path.join(output_dir, record_schema.shard_pattern(split))))
    records = []
    spec = record_schema.feature_spec()
    for raw in tf.data.TFRecordDataset(paths):
        parsed = tf.io.parse_single_example(raw, spec)
        records.append({
            "product_id": int(parsed["product_id"][0]),
            "category_id": int(parsed["category_id"][0]),
            "label": int(parsed["label"][0]),
            "images": [bytes(b) for b in parsed["images"].numpy()],
            "mask": [int(m) for m in parsed["mask"].numpy()],
            "raw": raw.numpy(),
        })
    return records


def read_rejected(output_dir) -> list[dict]:
    rows = []
    for path in sorted(glob.glob(os.path.join(output_dir, record_schema.rejected_pattern()))):
        with open(path) as f:
            rows += [json.loads(line) for line in f if line.strip()]
    return rows


def read_metadata(output_dir) -> dict:
    with open(os.path.join(output_dir, record_schema.METADATA_FILE)) as f:
        return json.load(f)


def read_labels(output_dir) -> list[dict]:
    with open(os.path.join(output_dir, record_schema.LABELS_FILE), newline="") as f:
        return list(csv.DictReader(f))


def record_multiset(output_dir) -> collections.Counter:
    return collections.Counter(
        (split, record["raw"]) for split in record_schema.SPLITS for record in read_records(output_dir, split)
    )


def count_records(path) -> int:
    """Records in one TFRecord file, from its length prefixes (no TensorFlow, no CRC check)."""
    count = 0
    with open(path, "rb") as f:
        while header := f.read(12):
            f.seek(int.from_bytes(header[:8], "little") + 4, os.SEEK_CUR)
            count += 1
    return count


def shard_counts(output_dir, split) -> list[int]:
    """Records per shard of a split, in the shards' name order."""
    return [count_records(path)
            for path in sorted(glob.glob(os.path.join(output_dir, record_schema.shard_pattern(split))))]


def synthetic_bson(path, products: int, seed: int = 0, **kwargs):
    """A synthetic Cdiscount-like BSON (sample_data/synthetic.py), written once per path."""
    from sample_data import synthetic

    if not os.path.exists(path):
        synthetic.write_bson(path, products, seed=seed, **kwargs)
    return path
