"""Class mix of training batches from a category-sorted catalogue (issue 17 item 4).

    python -m bench.class_mix_benchmark [--products=12000] [--categories=300] [--range_size=1000]
        [--rounds=3] [--pipeline_batches=60] [--work_dir=DIR] [--simulate_only]

Two parts, each printing distinct classes per training batch against a uniform shuffle of the
same products (mean over batches; the uniform figure draws batches without replacement from the
label list):

  simulated   train.bson's scale, labels only: 7,069,896 products in category order over 5,270
              classes of Zipf-like sizes (weight 1/rank**0.6: the largest 94 k, the smallest
              550; the real sizes are not in the repo), index ranges of 10,000, 707 shards. Shard
              layouts: `before` = the input order cut evenly (the converter until issue 17),
              `after` = beam_convert.mix (the converter's own functions). Read by the seeded
              training stream's own function (sources.seeded_passes: file order drawn per pass,
              interleave of 16 files, records permuted in blocks of the shuffle buffer) over the
              labels' positions, then batched. For batch 64 / buffer 2,048 (train.py's
              defaults) and batch 512 / buffer 2,048 and 16,384 (configs/xception_gpu.flags).
  measured    `--products` products in category order (real JPEGs of data/train_example.bson
              reused, 1.3 images a product) converted by `python -m beam_convert` of the tree this
              runs in, then read by create_dataset(training=True) itself (batch 64, buffer 2,048,
              90 px): class mix over one epoch for each of 3 seeds, and pipeline products/s
              (180 px, the defaults) over `--pipeline_batches` batches after 5 of warm-up.
              Each of `--rounds` rounds converts again and times it (products/s, start-up
              included). Rates also per CPU-second (the converter's process tree; this
              process for the pipeline), which other work on a shared machine disturbs less.

Run from a copy of another version of the repository to measure that version (the converter is
run as `python -m beam_convert` from the current directory).
"""

import argparse
import json
import os
import resource
import shutil
import statistics
import subprocess
import sys
import time

import numpy as np

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

SIM_PRODUCTS, SIM_CLASSES, SIM_RANGE = 7_069_896, 5270, 10_000
CYCLE = 16  # create_dataset's interleave cycle


def uniform_distinct(labels: np.ndarray, batch: int, batches: int = 300, seed: int = 1) -> float:
    rng = np.random.default_rng(seed)
    return float(np.mean([len(np.unique(labels[rng.choice(len(labels), batch, replace=False)]))
                          for _ in range(batches)]))


def read_shards(shard_labels: list[np.ndarray], batch: int, buffer: int, batches: int, seed: int) -> float:
    """Distinct classes per batch, the shards read by the seeded training stream's own function
    (model/input_pipeline/sources.seeded_passes: a file order drawn from the pass, 16 files
    interleaved, records permuted in blocks of `buffer`), a shard's positions standing in for its
    records."""
    import tensorflow as tf

    from model.input_pipeline import sources

    offsets = tf.constant(np.concatenate([[0], np.cumsum([len(s) for s in shard_labels])]), tf.int64)
    flat = np.concatenate(shard_labels)

    def read(name):
        k = tf.strings.to_number(name, tf.int64)
        return tf.data.Dataset.range(offsets[k], offsets[k + 1])

    ds = sources.seeded_passes([str(k) for k in range(len(shard_labels))], read, seed=seed, shuffle_buffer=buffer,
                               repeat=False, skip_records=0, share_records=None)
    ds = ds.batch(batch, drop_remainder=True).take(batches)
    return float(np.mean([len(np.unique(flat[positions.numpy()])) for positions in ds]))


def simulate() -> list[dict]:
    from beam_convert import mix

    rng = np.random.default_rng(0)
    weights = 1 / np.arange(1, SIM_CLASSES + 1) ** 0.6
    sizes = np.maximum(1, np.round(weights / weights.sum() * SIM_PRODUCTS)).astype(np.int64)
    labels = np.repeat(rng.permutation(SIM_CLASSES), sizes)  # category order: one class after another
    total = len(labels)
    ids = rng.choice(2**40, total, replace=False).astype(np.int64)
    ranges = -(-total // SIM_RANGE)
    shards = ranges  # the default: one per range
    before = [labels[k * total // shards:(k + 1) * total // shards] for k in range(shards)]
    buckets = mix.bucket_count(SIM_RANGE)
    range_ids, range_ids_written, range_labels = [], [], []
    for number in range(ranges):
        chunk = slice(number * SIM_RANGE, min(total, (number + 1) * SIM_RANGE))
        order = mix.range_order(ids[chunk], buckets)
        range_ids.append(f"00000-{number * SIM_RANGE:015d}")
        range_ids_written.append(ids[chunk][order])
        range_labels.append(labels[chunk][order])
    started = time.perf_counter()
    stream = mix.stream_pieces(range_ids, range_ids_written, buckets)
    cut = mix.cut(stream, shards)
    plan_seconds = time.perf_counter() - started
    after = [np.concatenate([range_labels[s][first:end] for s, first, end in shard.tolist()]) for shard in cut]
    rows = []
    for batch, buffer in ((64, 2048), (512, 2048), (512, 16384)):
        uniform = uniform_distinct(labels, batch)
        row = {"batch": batch, "buffer": buffer, "uniform": uniform}
        for name, layout in (("before", before), ("after", after)):
            row[name] = statistics.mean(read_shards(layout, batch, buffer, 40, seed) for seed in range(3))
        rows.append(row)
    print(f"\nsimulated: {total:,} products in category order, {SIM_CLASSES:,} classes, {ranges} ranges of "
          f"{SIM_RANGE:,}, {shards} shards; {len(stream):,} pieces, planned in {plan_seconds:.1f} s")
    print(f"{'batch':>6s} {'buffer':>7s} {'uniform':>8s} {'before':>7s} {'ratio':>6s} {'after':>7s} {'ratio':>6s}")
    for r in rows:
        print(f"{r['batch']:6d} {r['buffer']:7d} {r['uniform']:8.1f} {r['before']:7.1f} {r['before'] / r['uniform']:6.2f} "
              f"{r['after']:7.1f} {r['after'] / r['uniform']:6.2f}")
    return rows


def write_sorted_bson(path: str, products: int, categories: int) -> np.ndarray:
    """Products in category order, their images those of data/train_example.bson, cycled."""
    import bson

    from tests.convert_helpers import sample_documents

    documents = sample_documents()
    rng = np.random.default_rng(0)
    ids = rng.choice(10**9, products, replace=False)
    labels = np.sort(rng.integers(0, categories, products))  # uneven categories, in order
    with open(path + ".part", "wb") as f:
        for n, (product_id, label) in enumerate(zip(ids.tolist(), labels.tolist())):
            f.write(bson.encode({"_id": product_id, "imgs": documents[n % len(documents)]["imgs"],
                                 "category_id": 1000 + label}))
    os.replace(path + ".part", path)
    return labels


def measure(args) -> dict:
    import tensorflow as tf

    from model.input_pipeline.dataset import create_dataset

    os.makedirs(args.work_dir, exist_ok=True)
    source = os.path.join(args.work_dir, f"sorted-{args.products}-{args.categories}.bson")
    labels = write_sorted_bson(source, args.products, args.categories)
    out = os.path.join(args.work_dir, "out")
    convert_rates, convert_cpu_rates, mix_ratios, pipeline_rates, pipeline_cpu_rates = [], [], [], [], []
    uniform = uniform_distinct(labels, 64)
    for _ in range(args.rounds):
        shutil.rmtree(out, ignore_errors=True)
        cpu = resource.getrusage(resource.RUSAGE_CHILDREN)
        started = time.perf_counter()
        subprocess.run([sys.executable, "-m", "beam_convert", f"--input={source}", f"--output_dir={out}",
                        f"--range_size={args.range_size}"], check=True, capture_output=True)
        convert_rates.append(args.products / (time.perf_counter() - started))
        after = resource.getrusage(resource.RUSAGE_CHILDREN)
        convert_cpu_rates.append(args.products / (after.ru_utime + after.ru_stime - cpu.ru_utime - cpu.ru_stime))
        pattern = os.path.join(out, "train-*-of-*.tfrecord")
        distinct = []
        for seed in range(3):
            ds = create_dataset(pattern, batch_size=64, training=True, image_size=90, shuffle_buffer=2048, seed=seed)
            distinct += [len(np.unique(label.numpy())) for _, label in ds]
        mix_ratios.append(float(np.mean(distinct)) / uniform)
        ds = create_dataset(pattern, batch_size=64, training=True, shuffle_buffer=2048, seed=0, repeat=True)
        iterator = iter(ds)
        for _ in range(5):
            next(iterator)
        started, cpu_started = time.perf_counter(), time.process_time()
        for _ in range(args.pipeline_batches):
            next(iterator)
        pipeline_rates.append(64 * args.pipeline_batches / (time.perf_counter() - started))
        pipeline_cpu_rates.append(64 * args.pipeline_batches / (time.process_time() - cpu_started))
        del iterator, ds
    shards = len(tf.io.gfile.glob(os.path.join(out, "train-*-of-*.tfrecord")))
    result = {"products": args.products, "categories": args.categories, "range_size": args.range_size,
              "train_shards": shards, "uniform_distinct": uniform, "class_mix": mix_ratios,
              "convert_products_per_s": convert_rates,
              "convert_products_per_cpu_s": convert_cpu_rates, "pipeline_products_per_s": pipeline_rates,
              "pipeline_products_per_cpu_s": pipeline_cpu_rates}
    print(f"\nmeasured ({os.getcwd()}): {args.products:,} products in category order, {args.categories} categories, "
          f"--range_size={args.range_size}: {shards} train shards; uniform {uniform:.1f} classes a batch of 64")
    for name in ("class_mix", "convert_products_per_s", "convert_products_per_cpu_s", "pipeline_products_per_s",
                 "pipeline_products_per_cpu_s"):
        values = result[name]
        print(f"  {name:24s} " + "  ".join(f"{v:,.2f}" if v < 10 else f"{v:,.0f}" for v in values))
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--products", type=int, default=12_000)
    parser.add_argument("--categories", type=int, default=300)
    parser.add_argument("--range_size", type=int, default=1000)
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--pipeline_batches", type=int, default=60)
    parser.add_argument("--work_dir", default="/tmp/class-mix-bench")
    parser.add_argument("--simulate_only", action="store_true")
    parser.add_argument("--measure_only", action="store_true")
    args = parser.parse_args()
    summary = {}
    if not args.measure_only:
        summary["simulated"] = simulate()
    if not args.simulate_only:
        summary["measured"] = measure(args)
    os.makedirs(args.work_dir, exist_ok=True)
    with open(os.path.join(args.work_dir, "class_mix_benchmark.json"), "w") as f:
        json.dump(summary, f, indent=2)


if __name__ == "__main__":
    main()
