"""What exact resume costs: skipping records before decode vs checkpointing the iterator (issue 17).

    python -m bench.resume_benchmark [--records_mb=300] [--shards=16] [--shuffle_buffer=16384]
        [--rounds=3] [--checkpoint_rounds=2] [--work_dir=DIR] [--results=bench/RESULTS_resume.md]

Data: the 82 real products of data/train_example.bson (~7.7 KB a record, near the full data's
~8.2 KB: 58 GB / 7.07 M) written again and again with new product ids, in a plain loop, until
`records_mb` of TFRecords in `shards` files. In one process, rounds alternated:

  read        every record of one pass through the same 16-file interleave, no shuffle: the
              reading ceiling (page-cached files: the data was just written).
  skip        `sources.seeded_passes(...)` (the seeded training stream's record stage, with the
              `shuffle_buffer`) then `.skip(n)`, n = one pass less one batch (the worst resume: the
              last batch of a pass), timed to the first record after it, minus the same at n = 0:
              records/s and MB/s of skipping.
  resume      `create_dataset` (training, seeded, 180 px, batch 64, the shuffle_buffer, repeat):
              first-batch latency at a start (StreamStart) at the last batch of pass 0, and 1,000 passes
              in (whole passes are never read), against a start at batch 0.
  checkpoint  `tf.train.Checkpoint(iterator=iter(create_dataset(...)))` after the first batch (the
              shuffle buffer is full by then): save time and size, restore time into a fresh
              iterator, and whether the next batches match the uninterrupted iterator's.
  disk        `dd iflag=direct` of one shard: what the local disk gives when nothing is cached.

Then a `sample` block: the 82-product sample folder (tests/record_helpers.write_data_dir, 66 train
records, batch 8, cpu_tiny's 48 px), first-batch latency at start batch 0, the last batch of a
pass and 1,000,000 batches in.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import shutil
import statistics
import subprocess
import sys
import tempfile
import time

from bench import results as results_file

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS_resume.md"
BATCH = 64
SEED = 12345


def write_records(out_dir: str, megabytes: int, shards: int) -> dict:
    """The sample's products again and again (new ids) into `shards` files, records dealt round-robin."""
    import bson
    import tensorflow as tf

    import record_schema

    with open(ROOT / "data" / "train_example.bson", "rb") as f:
        docs = list(bson.decode_file_iter(f))
    encoded = [(d["category_id"], [im["picture"] for im in d["imgs"]][:record_schema.MAX_IMAGES]) for d in docs]
    writers = [tf.io.TFRecordWriter(os.path.join(out_dir, record_schema.shard_name("train", s, shards)))
               for s in range(shards)]
    counts, total, n = [0] * shards, 0, 0
    while total < megabytes << 20:
        category, pictures = encoded[n % len(encoded)]
        record = record_schema.encode_example(1_000_000 + n, category, n % len(encoded), pictures)
        writers[n % shards].write(record)
        counts[n % shards] += 1
        total += len(record)
        n += 1
    for writer in writers:
        writer.close()
    files = [os.path.join(out_dir, record_schema.shard_name("train", s, shards)) for s in range(shards)]
    return {"files": files, "records": n, "bytes": sum(os.path.getsize(p) for p in files),
            "record_counts": dict(zip(files, counts)), "pattern": os.path.join(out_dir, record_schema.shard_pattern("train"))}


def first(ds) -> float:
    """Seconds from building an iterator to its first element."""
    start = time.perf_counter()
    next(iter(ds))
    return time.perf_counter() - start


def read_all(files: list[str]) -> float:
    """Seconds to read every record once through a 16-file interleave (the read ceiling)."""
    import tensorflow as tf

    ds = tf.data.Dataset.from_tensor_slices(files).interleave(
        tf.data.TFRecordDataset, cycle_length=min(len(files), 16), num_parallel_calls=tf.data.AUTOTUNE,
        deterministic=True)
    start = time.perf_counter()
    for _ in ds.batch(1024).prefetch(2):
        pass
    return time.perf_counter() - start


def skip_time(files: list[str], n: int, shuffle_buffer: int) -> float:
    """Seconds to the first record after skipping n of the seeded record stage."""
    import tensorflow as tf

    from model.input_pipeline import sources

    ds = sources.seeded_passes(files, tf.data.TFRecordDataset, seed=SEED, shuffle_buffer=shuffle_buffer,
                               repeat=True, skip_records=0, share_records=None)
    return first(ds.skip(n))


def training_stream(data: dict, shuffle_buffer: int, start_batch: int):
    from model import input_pipeline

    return input_pipeline.create_dataset(data["pattern"], batch_size=BATCH, training=True, repeat=True,
                                         shuffle_buffer=shuffle_buffer, seed=SEED,
                                         start=input_pipeline.StreamStart(start_batch, data["record_counts"]))


def checkpoint_round(data: dict, shuffle_buffer: int, directory: str) -> dict:
    """Save and restore the training iterator after its first batch; check the batches after it."""
    import numpy as np
    import tensorflow as tf

    shutil.rmtree(directory, ignore_errors=True)
    refused = ""
    try:  # as train.py builds it
        probe = iter(training_stream(data, 64, 0))
        next(probe)
        tf.train.Checkpoint(iterator=probe).save(os.path.join(directory, "probe", "ckpt"))
    except tf.errors.FailedPreconditionError as error:
        refused = str(error).split("}}")[-1].split("[Op:")[0].strip()
    del probe
    # The seeded passes' shuffle takes its seed from a tensor inside flat_map, which tf.data's
    # default external-state policy refuses to serialize: told to ignore it, the save goes through
    # (the seed is recomputed from the pass index on restore; the batch check below says whether
    # the restored stream is the same).
    ignore = tf.data.Options()
    ignore.experimental_external_state_policy = tf.data.experimental.ExternalStatePolicy.IGNORE
    shutil.rmtree(directory, ignore_errors=True)
    ds = training_stream(data, shuffle_buffer, 0).with_options(ignore)
    iterator = iter(ds)
    start = time.perf_counter()
    next(iterator)
    fill = time.perf_counter() - start
    checkpoint = tf.train.Checkpoint(iterator=iterator)
    start = time.perf_counter()
    path = checkpoint.save(os.path.join(directory, "ckpt"))
    save = time.perf_counter() - start
    size = sum(f.stat().st_size for f in pathlib.Path(directory).iterdir())
    expected = [next(iterator)[0]["product_id"].numpy() for _ in range(2)]
    del iterator, checkpoint
    fresh = iter(training_stream(data, shuffle_buffer, 0).with_options(ignore))
    start = time.perf_counter()
    tf.train.Checkpoint(iterator=fresh).restore(path).assert_consumed()
    got = next(fresh)[0]["product_id"].numpy()
    restore = time.perf_counter() - start
    same = bool(np.array_equal(got, expected[0]) and np.array_equal(next(fresh)[0]["product_id"].numpy(), expected[1]))
    return {"fill": fill, "save": save, "size": size, "restore": restore, "same": same, "refused": refused}


def disk_rate(path: str) -> float | None:
    """MB/s of an uncached (O_DIRECT) read of one file, or None where dd cannot do it."""
    done = subprocess.run(["dd", f"if={path}", "of=/dev/null", "bs=1M", "iflag=direct"],
                          capture_output=True, text=True)
    for token in done.stderr.replace(",", " ").split("copied")[-1:]:
        try:
            seconds = float(token.split()[0])
            return os.path.getsize(path) / 2**20 / seconds
        except (ValueError, IndexError):
            return None
    return None


def sample_latencies(work: str, rounds: int) -> dict:
    """First-batch latency on the 82-product sample: start 0, the last batch of the pass, far in."""
    sys.path.insert(0, str(ROOT))
    from model import input_pipeline
    from tests.record_helpers import write_data_dir

    import record_schema

    folder = os.path.join(work, "sample")
    write_data_dir(folder, shards=2)
    import tensorflow as tf

    files = sorted(tf.io.gfile.glob(os.path.join(folder, record_schema.shard_pattern("train"))))
    counts = {p: sum(1 for _ in tf.data.TFRecordDataset(p)) for p in files}
    batch = 8
    per_pass = sum(counts.values())
    starts = {"start 0": 0, f"last batch of pass 0 ({per_pass // batch - 1})": per_pass // batch - 1,
              "1,000,000 batches in": 1_000_000}
    times = {name: [] for name in starts}
    for _ in range(rounds):
        for name, start_batch in starts.items():
            ds = input_pipeline.create_dataset(os.path.join(folder, record_schema.shard_pattern("train")),
                                               batch_size=batch, training=True, repeat=True,
                                               image_size=48, shuffle_buffer=2048, seed=SEED,
                                               start=input_pipeline.StreamStart(start_batch, counts))
            times[name].append(first(ds))
    return {"records": per_pass, "times": times}


def report(data: dict, rows: dict, checkpoints: list[dict], disk: float | None, sample: dict, args,
           load: tuple[float, float], seconds: float) -> str:
    mb = data["bytes"] / 2**20
    record_kb = data["bytes"] / data["records"] / 1024
    med = {k: statistics.median(v) for k, v in rows.items()}
    skip_n = data["records"] - BATCH
    skip_seconds = med["skip one pass"] - med["skip 0"]
    skip_rate = skip_n / skip_seconds
    read_rate = data["records"] / med["read one pass"]
    cpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    model = next((line.split(":", 1)[1].strip() for line in cpu.splitlines() if line.startswith("Model name")), "?")
    out = [f"{data['records']:,} records ({mb:.0f} MB, {record_kb:.1f} KB a record: the sample's 82 real products "
           f"repeated), {args.shards} shards; shuffle_buffer {args.shuffle_buffer:,}; batch {BATCH}; "
           f"{args.rounds} rounds alternated, medians; {model}, {os.cpu_count()} CPUs; load average (1 min) "
           f"{load[0]:.1f} at the start, {load[1]:.1f} at the end; {seconds:.0f} s in all.", "",
           "| measurement | median s | rounds (s) |", "|---|---:|---|"]
    for name, values in rows.items():
        out.append(f"| {name} | {med[name]:.2f} | {', '.join(f'{v:.2f}' for v in values)} |")
    out += ["",
            f"- read ceiling: **{read_rate:,.0f} records/s, {read_rate * record_kb / 1024:,.0f} MB/s** (one pass, no shuffle)",
            f"- skip (`seeded_passes` + `.skip`, {skip_n:,} records): **{skip_rate:,.0f} records/s, "
            f"{skip_rate * record_kb / 1024:,.0f} MB/s**, {skip_rate / read_rate:.2f} of the read ceiling",
            f"- resume at the last batch of the pass vs start 0 (`create_dataset`): first batch "
            f"{med['resume: last batch of pass 0']:.2f} s vs {med['resume: start 0']:.2f} s "
            f"(x{med['resume: last batch of pass 0'] / med['resume: start 0']:.1f}); 1,000 passes in: "
            f"{med['resume: 1,000 passes in']:.2f} s",
            "- local disk, uncached (`dd iflag=direct` of one shard): "
            + (f"**{disk:,.0f} MB/s**" if disk else "not measured (dd failed)")]
    if checkpoints:
        size = statistics.median(c["size"] for c in checkpoints) / 2**20
        save = statistics.median(c["save"] for c in checkpoints)
        restore = statistics.median(c["restore"] for c in checkpoints)
        fill = statistics.median(c["fill"] for c in checkpoints)
        out += ["", "| checkpoint round | first batch (fill) s | save s | size MB | restore + 1st batch s | next 2 batches match |",
                "|---|---:|---:|---:|---:|---|"]
        for i, c in enumerate(checkpoints):
            out.append(f"| {i + 1} | {c['fill']:.2f} | {c['save']:.2f} | {c['size'] / 2**20:.1f} | "
                       f"{c['restore']:.2f} | {c['same']} |")
        buffer_mb = args.shuffle_buffer * record_kb / 1024
        if checkpoints[0]["refused"]:
            out += ["", f"- the training iterator as `create_dataset` builds it **cannot be saved**: "
                    f"`{checkpoints[0]['refused']}` (default external-state policy); the rows above ran "
                    "with `experimental_external_state_policy = IGNORE`"]
        out += [f"- iterator checkpoint: **{size:.0f} MB** ({size / buffer_mb:.2f}x the shuffle buffer's "
                f"{args.shuffle_buffer:,} records x {record_kb:.1f} KB = {buffer_mb:.0f} MB), saved in **{save:.2f} s** "
                f"({size / save:.0f} MB/s), restored in {restore:.2f} s; the fill to the first batch {fill:.2f} s"]
    if sample:
        out += ["", f"Sample folder ({sample['records']} train records, 2 shards, batch 8, 48 px, shuffle_buffer 2,048), "
                "first-batch latency:", "", "| start | median s | rounds (s) |", "|---|---:|---|"]
        for name, values in sample["times"].items():
            out.append(f"| {name} | {statistics.median(values):.3f} | {', '.join(f'{v:.3f}' for v in values)} |")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--records_mb", type=int, default=300, help="MB of TFRecords to write")
    parser.add_argument("--shards", type=int, default=16)
    parser.add_argument("--shuffle_buffer", type=int, default=16384)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--checkpoint_rounds", type=int, default=2, help="0: no iterator checkpoint")
    parser.add_argument("--sample_rounds", type=int, default=5, help="0: no sample block")
    parser.add_argument("--work_dir", help="keep data here (default: a temporary folder, removed)")
    parser.add_argument("--results", default=str(RESULTS), help="markdown file to write ('' for none)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    load_start = os.getloadavg()[0]
    work = args.work_dir or tempfile.mkdtemp(prefix="resume_bench_")
    os.makedirs(work, exist_ok=True)
    try:
        records = os.path.join(work, "records")
        shutil.rmtree(records, ignore_errors=True)
        os.makedirs(records)
        data = write_records(records, args.records_mb, args.shards)
        print(f"data: {data['records']} records, {data['bytes'] / 2**20:.0f} MB in {records} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        last = data["records"] // BATCH - 1
        per_pass = data["records"] // BATCH
        cases = {
            "read one pass": lambda: read_all(data["files"]),
            "skip 0": lambda: skip_time(data["files"], 0, args.shuffle_buffer),
            "skip one pass": lambda: skip_time(data["files"], data["records"] - BATCH, args.shuffle_buffer),
            "resume: start 0": lambda: first(training_stream(data, args.shuffle_buffer, 0)),
            "resume: last batch of pass 0": lambda: first(training_stream(data, args.shuffle_buffer, last)),
            "resume: 1,000 passes in": lambda: first(training_stream(data, args.shuffle_buffer, 1000 * per_pass + last)),
        }
        rows = {name: [] for name in cases}
        for r in range(args.rounds):
            for name, run in (cases.items() if r % 2 == 0 else reversed(cases.items())):
                rows[name].append(run())
                print(f"  round {r + 1}: {name:32s} {rows[name][-1]:7.2f} s", file=sys.stderr, flush=True)
        checkpoints = []
        for r in range(args.checkpoint_rounds):
            checkpoints.append(checkpoint_round(data, args.shuffle_buffer, os.path.join(work, "ckpt")))
            print(f"  checkpoint round {r + 1}: {checkpoints[-1]}", file=sys.stderr, flush=True)
        disk = disk_rate(data["files"][0])
        sample = sample_latencies(work, args.sample_rounds) if args.sample_rounds else {}
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)
    figures = report(data, rows, checkpoints, disk, sample, args, (load_start, os.getloadavg()[0]),
                     time.perf_counter() - start)
    results_file.publish(figures, "bench.resume_benchmark", argv, args.results, "resume_benchmark",
                         "## Exact resume (issue 17)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
