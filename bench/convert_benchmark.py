"""Conversion benchmark: the Beam job on its local default runner against a plain loop.

    python -m bench.convert_benchmark [--products=100000] [--small_products=20000] [--work_dir=DIR]

Both write the same records (checked: same multiset of serialized records per split) from the
same synthetic BSON. The plain loop is the conversion people write by hand: bson.decode_file_iter
-> label -> split -> tf.train.Example bytes -> tf.io.TFRecordWriter, one process, no validation
(so it is the faster of the two by construction). Each side runs as its own command and is
timed end to end, start-up included, while a sampler adds up the resident memory of its process
tree (Beam's worker processes included) to find the peak.
"""

import argparse
import collections
import glob
import json
import os
import subprocess
import sys
import threading
import time

import resource

import psutil

import record_schema
from beam_convert.job import ConvertConfig

PLAIN_LOOP = r"""
import csv, sys, time
import bson
import tensorflow as tf
import record_schema
from beam_convert import products

source, out_dir, labels_csv, val_fraction = sys.argv[1], sys.argv[2], sys.argv[3], float(sys.argv[4])
with open(labels_csv, newline="") as f:
    label_of = {int(row["category_id"]): int(row["label"]) for row in csv.DictReader(f)}
writers = {}
started = time.perf_counter()
count = 0
with open(source, "rb") as f:
    for doc in bson.decode_file_iter(f):
        images = tuple(img["picture"] for img in doc["imgs"][:record_schema.MAX_IMAGES])
        digests = [record_schema.image_digest(image) for image in images]
        split = products.choose_split(products.split_key(digests), val_fraction)
        if split not in writers:
            writers[split] = tf.io.TFRecordWriter(f"{out_dir}/{record_schema.shard_name(split, 0, 1)}")
        writers[split].write(record_schema.encode_example(
            doc["_id"], doc["category_id"], label_of[doc["category_id"]], images))
        count += 1
for writer in writers.values():
    writer.close()
print(count / (time.perf_counter() - started))
"""


def _children_cpu_seconds() -> float:
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return usage.ru_utime + usage.ru_stime


def run_measured(command: list[str]) -> tuple[float, float, str, float]:
    """Runs a command; returns (wall seconds, peak RSS of its process tree in MB, stdout, CPU
    seconds of its process tree). CPU time is what other processes on a shared machine disturb
    least: compare versions by products per CPU-second."""
    peak = 0
    cpu_before = _children_cpu_seconds()
    started = time.perf_counter()
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    done = threading.Event()

    def sample():
        nonlocal peak
        root = psutil.Process(process.pid)
        while not done.is_set():
            try:
                tree = [root] + root.children(recursive=True)
                peak = max(peak, sum(p.memory_info().rss for p in tree if p.is_running()))
            except psutil.Error:
                pass
            done.wait(0.05)

    sampler = threading.Thread(target=sample, daemon=True)
    sampler.start()
    stdout, stderr = process.communicate()
    elapsed = time.perf_counter() - started
    done.set()
    sampler.join()
    if process.returncode:
        sys.exit(f"failed: {' '.join(command)}\n{stderr[-3000:]}")
    return elapsed, peak / 1e6, stdout, _children_cpu_seconds() - cpu_before


def records_by_split(folder: str) -> collections.Counter:
    import tensorflow as tf  # only for the check, after the timed runs

    multiset = collections.Counter()
    for path in glob.glob(os.path.join(folder, "*.tfrecord")):
        split = os.path.basename(path).split("-")[0]
        multiset.update((split, r.numpy()) for r in tf.data.TFRecordDataset(path))
    return multiset


def make_input(work_dir: str, products: int) -> str:
    from sample_data import synthetic

    path = os.path.join(work_dir, f"synthetic-{products}.bson")
    if not os.path.exists(path):  # write_bson renames a finished file into place: this one is whole
        started = time.perf_counter()
        synthetic.write_bson(path, products, num_classes=20, seed=0)
        print(f"made {path} in {time.perf_counter() - started:.0f} s", file=sys.stderr)
    return path


def beam_command(source: str, out: str, extra=()) -> list[str]:
    return [sys.executable, "-m", "beam_convert", f"--input={source}", f"--output_dir={out}",
            "--overwrite", *extra]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--products", type=int, default=100_000)
    parser.add_argument("--small_products", type=int, default=20_000)
    parser.add_argument("--work_dir", default="/tmp/cdiscount-bench")
    parser.add_argument("--modes", default="default,in_memory,multi_processing",
                        help="Beam local modes to time on the large input")
    args = parser.parse_args()
    os.makedirs(args.work_dir, exist_ok=True)
    rows = []

    large = make_input(args.work_dir, args.products)
    small = make_input(args.work_dir, args.small_products)
    size_mb = os.path.getsize(large) / 1e6

    beam_out = os.path.join(args.work_dir, "beam")
    modes = {
        "default": [],
        "in_memory": ["--direct_running_mode=in_memory"],
        "multi_processing": ["--direct_running_mode=multi_processing", "--direct_num_workers=2"],
    }
    beam_runs = {}
    for mode in args.modes.split(","):
        out = f"{beam_out}-{mode}"
        beam_runs[mode] = run_measured(beam_command(large, out, modes[mode]))
        rows.append((f"beam_convert ({mode})", args.products, *beam_runs[mode][:2], beam_runs[mode][3]))

    plain_out = os.path.join(args.work_dir, "plain")
    os.makedirs(plain_out, exist_ok=True)
    for stale in glob.glob(os.path.join(plain_out, "*")):
        os.remove(stale)
    labels_csv = os.path.join(f"{beam_out}-{args.modes.split(',')[0]}", record_schema.LABELS_FILE)
    plain_seconds, plain_mb, plain_stdout, plain_cpu = run_measured(  # the Beam runs' split: their default val_fraction
        [sys.executable, "-c", PLAIN_LOOP, large, plain_out, labels_csv, str(ConvertConfig.val_fraction)])
    rows.append(("plain loop", args.products, plain_seconds, plain_mb, plain_cpu))

    small_runs = {}
    for mode in args.modes.split(","):
        small_runs[mode] = run_measured(beam_command(small, f"{beam_out}-small-{mode}", modes[mode]))
        rows.append((f"beam_convert ({mode}), small input", args.small_products, *small_runs[mode][:2],
                     small_runs[mode][3]))

    same = records_by_split(f"{beam_out}-{args.modes.split(',')[0]}") == records_by_split(plain_out)
    plain_rate = args.products / plain_seconds
    print(f"\ninput: {args.products:,} synthetic products, {size_mb:,.0f} MB; {os.cpu_count()} cores\n")
    print(f"{'run':42s} {'products':>9s} {'seconds':>8s} {'products/s':>11s} {'vs plain':>9s} {'peak MB':>8s} "
          f"{'CPU s':>7s} {'products/CPU-s':>15s}")
    for name, count, seconds, mb, cpu in rows:
        rate = count / seconds
        print(f"{name:42s} {count:9,d} {seconds:8.1f} {rate:11,.0f} {rate / plain_rate:8.2f}x {mb:8.0f} "
              f"{cpu:7.1f} {count / cpu:15,.0f}")
    print(f"\nplain loop inside its loop (imports excluded): {float(plain_stdout):,.0f} products/s")
    memory_ratios = {mode: beam_runs[mode][1] / small_runs[mode][1] for mode in beam_runs}
    for mode, ratio in memory_ratios.items():
        print(f"peak memory ({mode}), {args.products:,} vs {args.small_products:,} products: {ratio:.2f}x")
    print(f"same records as the plain loop: {same}")
    summary = {"rows": rows, "same_records": same, "memory_ratios": memory_ratios}
    with open(os.path.join(args.work_dir, "convert_benchmark.json"), "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
