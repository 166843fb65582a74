"""Helpers for the conversion tests: BSON documents on disk, the Beam stages run in a TestPipeline,
and reading the job's output back."""

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
import numpy as np
import tensorflow as tf
from apache_beam.metrics.metric import MetricsFilter
from apache_beam.runners.portability.fn_api_runner import FnApiRunner
from apache_beam.testing.test_pipeline import TestPipeline
from PIL import Image

import record_schema
from beam_convert import files, mix
from beam_convert.__main__ import main
from beam_convert.job import METRICS_NAMESPACE, ConvertConfig, SplitFile

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


# --- the stages in-process ----------------------------------------------------------------------

def stage_pipeline() -> TestPipeline:
    """A TestPipeline on the in-process FnApiRunner, the runner the command picks for small inputs
    (TestPipeline's default, the DirectRunner, may hand the job to another)."""
    return TestPipeline(runner=FnApiRunner())


def stage_config(tmp_path, **fields) -> ConvertConfig:
    """The config of a stage under test: output in tmp_path/out, the job's files in out/_tmp-test."""
    out = pathlib.Path(tmp_path) / "out"
    return ConvertConfig(output_dir=str(out), tmp_dir=str(out / "_tmp-test"), **fields)


def counters(result) -> dict[str, int]:
    """The job's counters (job.increment) after a pipeline ran, by name, summed over its steps."""
    totals = collections.Counter()
    for counter in result.metrics().query(MetricsFilter().with_namespace(METRICS_NAMESPACE))["counters"]:
        totals[counter.key.metric.name] += counter.committed
    return dict(totals)


def payload(product_id: int) -> bytes:
    """The stand-in record of a product in write_range_files: finalize copies records as bytes."""
    return f"record {product_id}".encode()


def write_range_files(config: ConvertConfig, range_id: str, split: str, ids) -> SplitFile:
    """One range's temporary files of one split as ConvertRange leaves them (the records in
    mix.range_order, with their ids and framed sizes in that order), each record payload(id)."""
    ids = np.asarray(ids, np.int64)
    order = mix.range_order(ids, mix.bucket_count(config.range_size))
    frames = [files.tfrecord_frame(payload(int(product_id))) for product_id in ids[order]]
    paths = [files.join(config.tmp_dir, kind, split, f"{range_id}.{ext}")
             for kind, ext in (("records", "tfrecord"), ("ids", "npy"), ("sizes", "npy"))]
    os.makedirs(os.path.dirname(paths[0]), exist_ok=True)
    pathlib.Path(paths[0]).write_bytes(b"".join(frames))
    for path, array in zip(paths[1:], (ids[order], np.array([len(frame) for frame in frames], np.int64))):
        os.makedirs(os.path.dirname(path), exist_ok=True)
        np.save(path, array)
    return SplitFile(paths[0], len(ids), len(ids), paths[1], paths[2])


def read_payloads(path) -> list[bytes]:
    """The records of one TFRecord file, from its length prefixes (no TensorFlow, no CRC check)."""
    records = []
    with open(path, "rb") as f:
        while header := f.read(12):
            records.append(f.read(int.from_bytes(header[:8], "little")))
            f.read(4)
    return records


# --- the command -----------------------------------------------------------------------------------

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
