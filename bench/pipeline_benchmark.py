"""Input pipeline throughput against the decode ceiling and a seed-style loader, on one data set.

    python -m bench.pipeline_benchmark [--products=6000] [--bson=PATH] [--batches=100]
        [--warmup=8] [--rounds=5] [--allocators=bfc] [--work_dir=DIR]
        [--results=bench/RESULTS_pipeline.md]

Without --bson it writes a synthetic Cdiscount-like BSON (sample_data.synthetic.write_bson) and
converts it to TFRecords with a plain loop over record_schema.encode_example, so the figures do not
depend on the Beam job. Then, on the same JPEGs:

  ceiling     every image of the data decoded at full size (180 px) by the pipeline's own decoder
              call (decode.decode_jpeg: INTEGER_ACCURATE, truncation recovery) in a
              parallel tf.data map (AUTOTUNE), nothing else; turned into products/s at the data's
              images per product.
  pipeline    model.input_pipeline.create_dataset(training=True, batch 64) as train.py builds it
              (its --seed and --shuffle_buffer, repeat) for: the defaults (180 px, no crop);
              configs/xception_gpu.flags (180 px, random 160 px crops); 90 px; and
              configs/cpu_tiny.flags (48 px). Image settings are read from the flag files. Then
              the defaults with seed=None (nondeterministic element order, what an unseeded stream
              costs less: issue 17), and the evaluation mode at the defaults. No mirror: the model
              does it (issue 11).
  seed-style  a Python generator over a BSON offset index (4-byte length, seek, read) decoding with
              PIL into uint8 [4, 180, 180, 3] stacks + mask, in tf.data.Dataset.from_generator.

Goals (issue 11): P1 = training pipeline / ceiling >= 0.9 for the defaults and for
xception_gpu.flags; P1-small = training pipeline at 90 px and at 48 px / ceiling >= 1.2 (products/s
against the full-size decode); P1b = pipeline (defaults) / seed-style >= 4.

--determinism=off,on adds, for each allocator, a process that first calls
tf.config.experimental.enable_op_determinism() (what train.py --deterministic does): its table is
keyed `ALLOCATOR+determinism`.

Each allocator setting runs in its own process (TensorFlow reads TF_CPU_ALLOCATOR_USE_BFC once):
`bfc`, TensorFlow's pooling allocator, is what train.py and evaluate.py set; `default` is glibc
malloc, whose fresh batch buffers page-fault on every batch on some machines. The machine may be
shared, so each loader runs `rounds` times, interleaved with the others (the ceiling first in each
round), for a fixed number of batches after a warm-up. A ratio is the median over rounds of the
loader's rate / the ceiling's rate in the same round (pairwise: a slow patch of the machine hits
both); the tables also give each loader's median and best round and its products per CPU-second
(process user + system time), which other processes disturb much less than wall time. On 2
dedicated cores a loader that keeps both busy has wall rate ~2x its CPU rate, the single-threaded
seed-style loader ~1x.
"""

from __future__ import annotations

import argparse
import io
import json
import os
import pathlib
import shutil
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time

from bench import results as results_file

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

BATCH = 64
IMAGE_SIZE = 180
ROOT = pathlib.Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS_pipeline.md"
GPU_FLAGS, CPU_FLAGS = ROOT / "configs" / "xception_gpu.flags", ROOT / "configs" / "cpu_tiny.flags"
# train.py's defaults for what shapes its training pipeline (model/training/loop.py TrainConfig).
TRAIN_DEFAULTS = {"image_size": 180, "crop_size": 0, "shuffle_buffer": 2048, "seed": 0}
CEILING, DEFAULT, GPU, SMALL90, CPU48, UNSEEDED, EVAL, SEED = (
    "ceiling: decode_jpeg map, 180 px", "train, defaults", "train, xception_gpu.flags",
    "train, defaults at 90 px", "train, cpu_tiny.flags", "train, defaults, seed=None",
    "eval, defaults (in order)", "seed-style PIL generator")
TRAIN_ROWS = (DEFAULT, GPU, SMALL90, CPU48, UNSEEDED)
GOALS = {DEFAULT: ("P1", 0.9), GPU: ("P1", 0.9), SMALL90: ("P1-small", 1.2), CPU48: ("P1-small", 1.2)}
ALLOCATORS = {"default": None, "bfc": "true"}


def train_settings(flagfile: pathlib.Path | None = None, **overrides) -> dict:
    """train.py's pipeline settings: its defaults, then a flag file's values, then overrides."""
    settings = dict(TRAIN_DEFAULTS)
    for line in flagfile.read_text().splitlines() if flagfile else []:
        name, _, value = line.strip().lstrip("-").partition("=")
        if name in settings and value:
            settings[name] = int(value)
    return {**settings, **overrides}


def describe(settings: dict) -> str:
    crop = f", crop {settings['crop_size']}" if settings["crop_size"] else ""
    return f"{settings['image_size']} px{crop}"


# ---------------------------------------------------------------------------------------------
# Data


def bson_offsets(path: str) -> list[tuple[int, int]]:
    """(offset, length) of every document: a BSON document starts with its int32 length."""
    offsets = []
    with open(path, "rb") as f:
        offset = 0
        while header := f.read(4):
            (length,) = struct.unpack("<i", header)
            offsets.append((offset, length))
            offset += length
            f.seek(offset)
    return offsets


def prepare(bson_path: str, out_dir: str, shards: int) -> dict:
    """BSON -> `shards` TFRecord files of contiguous products, with a plain loop."""
    import bson
    import tensorflow as tf

    import record_schema

    with open(bson_path, "rb") as f:
        docs = list(bson.decode_file_iter(f))
    labels = {c: i for i, c in enumerate(sorted({d["category_id"] for d in docs if "category_id" in d}))}
    per_shard = -(-len(docs) // shards)
    images = 0
    for s in range(shards):
        path = os.path.join(out_dir, record_schema.shard_name("train", s, shards))
        with tf.io.TFRecordWriter(path) as writer:
            for d in docs[s * per_shard:(s + 1) * per_shard]:
                pictures = [im["picture"] for im in d["imgs"]][:record_schema.MAX_IMAGES]
                images += len(pictures)
                category = d.get("category_id", record_schema.UNLABELLED)
                label = labels.get(category, record_schema.UNLABELLED)
                writer.write(record_schema.encode_example(d["_id"], category, label, pictures))
    return {"pattern": os.path.join(out_dir, record_schema.shard_pattern("train")), "bson": bson_path,
            "products": len(docs), "images": images,
            "jpeg_kb": os.path.getsize(bson_path) / max(images, 1) / 1024}


# ---------------------------------------------------------------------------------------------
# Loaders (worker process): each returns (infinite dataset, products per element)


def ceiling_loader(pattern: str, images_per_product: float):
    import tensorflow as tf

    import record_schema
    from model.input_pipeline import decode

    jpegs = []
    for serialized in tf.data.TFRecordDataset(sorted(tf.io.gfile.glob(pattern))).batch(1024):
        parsed = tf.io.parse_example(serialized, record_schema.feature_spec())
        jpegs.append(tf.boolean_mask(parsed[record_schema.IMAGES], parsed[record_schema.MASK] > 0))
    images_per_batch = round(BATCH * images_per_product)
    ds = tf.data.Dataset.from_tensor_slices(tf.concat(jpegs, 0)).repeat()
    ds = ds.map(lambda b: decode.decode_jpeg(b), num_parallel_calls=tf.data.AUTOTUNE)
    return ds.batch(images_per_batch).prefetch(tf.data.AUTOTUNE), images_per_batch / images_per_product


def pipeline_loader(pattern: str, training: bool, settings: dict):
    """create_dataset as train.py calls it (training) or as evaluation does (training=False)."""
    from model import input_pipeline

    image = {"image_size": settings["image_size"], "crop_size": settings["crop_size"] or None}
    if not training:
        return input_pipeline.create_dataset(pattern, batch_size=BATCH, training=False, repeat=True, **image), BATCH
    return input_pipeline.create_dataset(pattern, batch_size=BATCH, training=True, repeat=True,
                                         shuffle_buffer=settings["shuffle_buffer"], seed=settings["seed"],
                                         **image), BATCH


def seed_style_loader(bson_path: str):
    """The kind of loader Kaggle kernels started from: random access through an offset index,
    PIL decode, numpy stacks, one lock around the shared file handle."""
    import bson
    import numpy as np
    import tensorflow as tf
    from PIL import Image

    offsets = bson_offsets(bson_path)
    lock = threading.Lock()
    handle = open(bson_path, "rb")
    order = np.random.default_rng(0).permutation(len(offsets))
    n = 4

    def generate():
        i = 0
        while True:
            offset, length = offsets[order[i % len(order)]]
            i += 1
            with lock:
                handle.seek(offset)
                doc = bson.decode(handle.read(length))
            images = np.zeros((n, IMAGE_SIZE, IMAGE_SIZE, 3), np.uint8)
            mask = np.zeros(n, np.float32)
            for j, im in enumerate(doc["imgs"][:n]):
                picture = Image.open(io.BytesIO(im["picture"]))
                # convert() copies even an RGB picture; the fair seed-style skips it when it can.
                images[j] = np.asarray(picture if picture.mode == "RGB" else picture.convert("RGB"))
                mask[j] = 1.0
            yield {"images": images, "mask": mask}, doc.get("category_id", -1)

    spec = ({"images": tf.TensorSpec([n, IMAGE_SIZE, IMAGE_SIZE, 3], tf.uint8),
             "mask": tf.TensorSpec([n], tf.float32)}, tf.TensorSpec([], tf.int64))
    ds = tf.data.Dataset.from_generator(generate, output_signature=spec)
    return ds.batch(BATCH).prefetch(tf.data.AUTOTUNE), BATCH


def timed(iterator, per_element: float, batches: int) -> tuple[float, float]:
    """(products per wall second, products per CPU second of this process) over `batches`."""
    cpu, wall = time.process_time(), time.perf_counter()
    for _ in range(batches):
        next(iterator)
    cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    return per_element * batches / wall, per_element * batches / cpu


def worker(data: dict, args) -> dict:
    """Each round times every loader in turn on a fresh iterator (datasets are built once): a
    kept-alive iterator would fill its buffers while the others run and hand them out for free."""
    if args.worker.endswith("+determinism"):
        import tensorflow as tf

        tf.config.experimental.enable_op_determinism()
        tf.random.set_seed(0)  # random ops refuse to run unseeded then; train.py seeds everything first
    ipp = data["images"] / data["products"]
    settings = data["settings"]
    loaders = {
        CEILING: ceiling_loader(data["pattern"], ipp),
        **{name: pipeline_loader(data["pattern"], True, settings[name]) for name in TRAIN_ROWS},
        EVAL: pipeline_loader(data["pattern"], False, settings[DEFAULT]),
        SEED: seed_style_loader(data["bson"]),
    }
    rates = {name: [] for name in loaders}
    load_start = os.getloadavg()[0]
    for r in range(args.rounds):
        for name, (ds, per_element) in loaders.items():
            slow = name == SEED
            iterator = iter(ds)
            for _ in range(2 if slow else args.warmup):  # fills buffers, lets the autotuner settle
                next(iterator)
            wall, cpu = timed(iterator, per_element, args.seed_batches if slow else args.batches)
            del iterator
            rates[name].append((wall, cpu))
            print(f"  [{args.worker}] round {r + 1}: {name:36s} {wall:7.0f} products/s, "
                  f"{cpu:7.0f} per CPU-s", file=sys.stderr, flush=True)
    return {"rates": rates, "load_start": load_start, "load": os.getloadavg()[0]}


# ---------------------------------------------------------------------------------------------
# Report


def report(data: dict, results: dict, args, seconds: float) -> str:
    ipp = data["images"] / data["products"]
    settings = data["settings"]
    out = [f"{data['products']} synthetic products, {data['images']} JPEGs ({ipp:.2f} a product, "
           f"~{data['jpeg_kb']:.1f} KB), {args.shards} shards; batch {BATCH}; {args.rounds} rounds of "
           f"{args.batches} timed batches a loader ({args.seed_batches} for seed-style) after {args.warmup} untimed; "
           f"{os.cpu_count()} CPUs; load average (1 min) at the start / end of each run: "
           + ", ".join(f"{k} {v['load_start']:.1f} / {v['load']:.1f}" for k, v in results.items())
           + f"; {seconds:.0f} s in all. Training rows as train.py builds them: "
           + "; ".join(f"{name}: {describe(settings[name])}, shuffle_buffer {settings[name]['shuffle_buffer']}, "
                       f"seed {settings[name]['seed']}" for name in TRAIN_ROWS) + "."]
    for allocator, result in results.items():
        rates = result["rates"]
        med = {k: statistics.median(w for w, _ in v) for k, v in rates.items()}
        best = {k: max(w for w, _ in v) for k, v in rates.items()}
        cpu = {k: statistics.median(c for _, c in v) for k, v in rates.items()}
        # Pairwise: each round's rate over the ceiling's in the same round, then the median.
        ratio = {k: statistics.median(w / c for (w, _), (c, _) in zip(v, rates[CEILING])) for k, v in rates.items()}
        spread = {k: (min(w / c for (w, _), (c, _) in zip(v, rates[CEILING])),
                      max(w / c for (w, _), (c, _) in zip(v, rates[CEILING]))) for k, v in rates.items()}
        out += ["", f"Allocator `{allocator}`:", "",
                "| loader | products/s median | best round | products per CPU-s | / ceiling: pairwise median (range) | / ceiling per CPU-s |",
                "|---|---:|---:|---:|---:|---:|"]
        for name in rates:
            out.append(f"| {name} | {med[name]:,.0f} | {best[name]:,.0f} | {cpu[name]:,.0f} | "
                       f"{ratio[name]:.2f} ({spread[name][0]:.2f}-{spread[name][1]:.2f}) | {cpu[name] / cpu[CEILING]:.2f} |")
        out.append("")
        for name, (goal, target) in GOALS.items():
            verdict = "met" if ratio[name] >= target else "NOT met"
            out.append(f"- {goal} {name} ({describe(settings[name])}) / ceiling = **{ratio[name]:.2f}** "
                       f"(rounds {spread[name][0]:.2f}-{spread[name][1]:.2f}; per CPU-s {cpu[name] / cpu[CEILING]:.2f})"
                       f"   goal >= {target}: {verdict}")
        if UNSEEDED in rates:
            seeded = statistics.median(w / u for (w, _), (u, _) in zip(rates[DEFAULT], rates[UNSEEDED]))
            out.append(f"- seeded (deterministic order) / seed=None at the defaults = **{seeded:.2f}** (pairwise "
                       f"median; per CPU-s {cpu[DEFAULT] / cpu[UNSEEDED]:.2f})")
        out.append(f"- P1b train defaults / seed-style = **{med[DEFAULT] / med[SEED]:.1f}x** (best rounds "
                   f"{best[DEFAULT] / best[SEED]:.1f}x; per CPU-s {cpu[DEFAULT] / cpu[SEED]:.1f}x)   goal >= 4x")
    return "\n".join(out) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--products", type=int, default=6000, help="synthetic products to write")
    parser.add_argument("--bson", help="use this BSON instead of writing a synthetic one")
    parser.add_argument("--shards", type=int, default=8)
    parser.add_argument("--batches", type=int, default=100, help="timed batches of 64 per loader and round")
    parser.add_argument("--warmup", type=int, default=8, help="untimed batches before each timed run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--seed_batches", type=int, default=8, help="timed batches for the slow seed-style loader")
    parser.add_argument("--allocators", default="bfc",
                        help=f"comma list of {sorted(ALLOCATORS)}; bfc is what train.py and evaluate.py set")
    parser.add_argument("--determinism", default="off",
                        help="comma list of off, on: on runs a process with enable_op_determinism (train.py --deterministic)")
    parser.add_argument("--work_dir", help="keep data here (default: a temporary folder, removed)")
    parser.add_argument("--results", default=str(RESULTS), help="markdown file to write ('' for none)")
    parser.add_argument("--worker", help=argparse.SUPPRESS)  # internal: measure in this process
    parser.add_argument("--data", help=argparse.SUPPRESS)
    args = parser.parse_args(argv)

    if args.worker:
        print(json.dumps(worker(json.loads(args.data), args)))
        return 0

    start = time.perf_counter()
    work = args.work_dir or tempfile.mkdtemp(prefix="pipeline_bench_")
    os.makedirs(work, exist_ok=True)
    try:
        bson_path = args.bson
        if not bson_path:
            bson_path = os.path.join(work, "synthetic.bson")
            if not os.path.exists(bson_path):
                from sample_data.synthetic import write_bson

                write_bson(bson_path, args.products, num_classes=20, seed=0, labelled=True)
        data = prepare(bson_path, work, args.shards)
        data["settings"] = {DEFAULT: train_settings(), GPU: train_settings(GPU_FLAGS),
                            SMALL90: train_settings(image_size=90), CPU48: train_settings(CPU_FLAGS),
                            UNSEEDED: train_settings(seed=None)}
        print(f"data: {data['products']} products, {data['images']} JPEGs, {args.shards} shards in {work} "
              f"({time.perf_counter() - start:.0f} s)", flush=True)

        results = {}
        for allocator, determinism in [(a, d) for d in args.determinism.split(",") for a in args.allocators.split(",")]:
            env = dict(os.environ)
            env.pop("TF_CPU_ALLOCATOR_USE_BFC", None)
            if ALLOCATORS[allocator]:
                env["TF_CPU_ALLOCATOR_USE_BFC"] = ALLOCATORS[allocator]
            child = [a for a in (argv if argv is not None else sys.argv[1:])]
            command = [sys.executable, "-m", "bench.pipeline_benchmark", *child,
                       f"--worker={allocator}{'+determinism' if determinism == 'on' else ''}",
                       f"--data={json.dumps(data)}"]
            done = subprocess.run(command, env=env, stdout=subprocess.PIPE, text=True, check=True,
                                  cwd=pathlib.Path(__file__).resolve().parent.parent)
            results[allocator + ("+determinism" if determinism == "on" else "")] = json.loads(done.stdout.strip().splitlines()[-1])
    finally:
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    figures = report(data, results, args, time.perf_counter() - start)
    results_file.publish(figures, "bench.pipeline_benchmark", argv, args.results, "pipeline_benchmark", "## Input pipeline (issue 3)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
