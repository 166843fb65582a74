"""Products/s delivered to one consumer through the tf.data service (1 and 2 workers, compression
off and AUTO) against the local pipeline, on the same data in the same run.

    python -m bench.data_service_benchmark [--products=3000] [--shards=32] [--batch=64]
        [--image_size=180] [--crop_size=160] [--batches=60] [--warmup=6] [--rounds=5]
        [--work_dir=DIR] [--results=bench/RESULTS_data_service.md]

Data: synthetic Cdiscount-like products (sample_data.synthetic.write_bson) converted with the plain
`encode_example` loop of bench/pipeline_benchmark.py; the wire sizes are also measured on the real
sample (data/train_example.bson, 82 products), whose photographs compress differently.

Loaders, all the training stream of `create_dataset` (training=True, repeat=True, batch 64, 180 px
decodes, random 160 px crops: configs/xception_gpu.flags), built once in this process:

  local            the pipeline in this process.
  service Nw, C    the same graph registered with a dispatcher that has N workers (launched with
                   `python -m model.data_service`, separate processes), read here through
                   `model.data_service.stream.distribute` with compression C (None or AUTO); dynamic
                   sharding (with `create_dataset(dynamic_sharding=True)` when it exists).

Each round runs every loader in turn on a fresh iterator (for the service: a new job iteration),
after `warmup` untimed batches, for `batches` timed ones; the rounds interleave the loaders so that
the machine's load falls on all of them. Per timed run: wall products/s, the CPU time of this
process (the consumer; for `local`, the whole pipeline) and of the worker processes (/proc), and
the bytes that crossed the loopback interface (/proc/net/dev `lo`: the gRPC traffic, once per
direction). Overhead per batch = (consumer + worker CPU) per batch through the service, less the
local pipeline's CPU per batch.
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
from model import cli
from tests.launchers import Service

cli.configure_environment()  # the same allocator and log level as train.py and the launchers

REPO = pathlib.Path(__file__).resolve().parent.parent
RESULTS = REPO / "bench" / "RESULTS_data_service.md"
REAL_SAMPLE = REPO / "data" / "train_example.bson"
LOCAL = "local"
GPU_IMAGES_PER_S = 3000  # the assumption: one GPU trains ~3,000 images/s at 160 px
GPUS = 8
# (workers, pack, compression): padded = the 4-slot stack as create_dataset makes it; packed = the
# real images only, the stack rebuilt on the trainer (stream.distribute(pack=True)).
SERVICE_LOADERS = [(1, False, None), (1, False, "AUTO"), (1, True, None), (1, True, "AUTO"), (2, True, None),
                   (2, True, "AUTO")]


def service_name(workers: int, pack: bool, compression) -> str:
    return f"service {workers}w, {'packed' if pack else 'padded'}, {compression or 'uncompressed'}"
FULL_DATA_IMAGES_PER_PRODUCT = 1.7  # train.bson: 12.4M images, 7.07M products


# ---------------------------------------------------------------------------------------------
# Processes and counters


def loopback_bytes() -> int:
    with open("/proc/net/dev") as f:
        for line in f:
            name, _, rest = line.partition(":")
            if name.strip() == "lo":
                return int(rest.split()[0])  # received = sent on lo
    return 0


# ---------------------------------------------------------------------------------------------
# Data


def prepare_data(work: str, products: int, shards: int) -> dict:
    from bench.pipeline_benchmark import prepare

    synthetic = os.path.join(work, "synthetic")
    os.makedirs(synthetic, exist_ok=True)
    bson_path = os.path.join(work, f"synthetic-{products}.bson")
    if not os.path.exists(bson_path):
        from sample_data.synthetic import write_bson

        write_bson(bson_path, products, num_classes=20, seed=0, labelled=True)
    data = prepare(bson_path, synthetic, shards)
    real = os.path.join(work, "real_sample")
    os.makedirs(real, exist_ok=True)
    data["real"] = prepare(str(REAL_SAMPLE), real, 4)
    return data


def dynamic_sharding() -> bool:
    import inspect

    from model import input_pipeline

    return "dynamic_sharding" in inspect.signature(input_pipeline.create_dataset).parameters


def training_stream(pattern: str, args, service: bool):
    from model import input_pipeline

    extra = {"dynamic_sharding": True} if service and dynamic_sharding() else {}
    return input_pipeline.create_dataset(pattern, batch_size=args.batch, training=True,
                                         image_size=args.image_size, crop_size=args.crop_size or None, repeat=True,
                                         seed=None, **extra)


# ---------------------------------------------------------------------------------------------
# Measurement


def timed_run(dataset, batches: int, warmup: int, services) -> dict:
    """One fresh iterator: warmup batches, then `batches` timed ones."""
    iterator = iter(dataset)
    for _ in range(warmup):
        next(iterator)
    worker_cpu = sum(s.cpu() for s in services)
    wire, cpu, wall = loopback_bytes(), time.process_time(), time.perf_counter()
    for _ in range(batches):
        next(iterator)
    wall, cpu = time.perf_counter() - wall, time.process_time() - cpu
    worker_cpu = sum(s.cpu() for s in services) - worker_cpu
    wire = loopback_bytes() - wire
    del iterator
    return {"wall": wall, "consumer_cpu": cpu, "worker_cpu": worker_cpu, "wire": wire, "batches": batches}


def wire_size(pattern: str, args, service: "Service", pack: bool, compression, batches: int = 12) -> float:
    """Loopback bytes per product for the real-sample stream (repeated: 82 products)."""
    from model.data_service import stream

    ds = stream.distribute(training_stream(pattern, args, True), service.target,
                                 job_name=f"wire-{pack}-{compression}-{time.time_ns()}", compression=compression,
                                 pack=pack)
    run = timed_run(ds, batches, 3, [])
    return run["wire"] / (batches * args.batch)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--products", type=int, default=3000, help="synthetic products to write")
    parser.add_argument("--shards", type=int, default=32)
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--image_size", type=int, default=180)
    parser.add_argument("--crop_size", type=int, default=160, help="0: no crop")
    parser.add_argument("--batches", type=int, default=60, help="timed batches per loader and round")
    parser.add_argument("--warmup", type=int, default=6, help="untimed batches before each timed run")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--work_dir", help="keep the data here (default: a temporary folder, removed)")
    parser.add_argument("--results", default=str(RESULTS), help="markdown file to write ('' for none)")
    args = parser.parse_args(argv)

    start = time.perf_counter()
    load_before = uptime()
    work = args.work_dir or tempfile.mkdtemp(prefix="data_service_bench_")
    os.makedirs(work, exist_ok=True)
    services = {}
    try:
        data = prepare_data(work, args.products, args.shards)
        print(f"data: {data['products']} products, {data['images']} JPEGs in {args.shards} shards "
              f"({time.perf_counter() - start:.0f} s)", flush=True)
        import tensorflow as tf  # noqa: F401  (after the data: the converters' imports are lighter)

        from model.data_service import stream

        services = {1: Service(1, timeout=120), 2: Service(2, timeout=120)}
        loaders = {LOCAL: (training_stream(data["pattern"], args, False), [])}
        for workers, pack, compression in SERVICE_LOADERS:
            name = service_name(workers, pack, compression)
            ds = stream.distribute(training_stream(data["pattern"], args, True), services[workers].target,
                                         job_name=f"bench-{name}", compression=compression, pack=pack)
            loaders[name] = (ds, [services[workers]])
        runs = {name: [] for name in loaders}
        for r in range(args.rounds):
            for name, (ds, used) in loaders.items():
                run = timed_run(ds, args.batches, args.warmup, used)
                runs[name].append(run)
                print(f"  round {r + 1}: {name:32s} {args.batch * run['batches'] / run['wall']:7.0f} products/s, "
                      f"consumer CPU {run['consumer_cpu']:.1f} s, workers {run['worker_cpu']:.1f} s, "
                      f"wire {run['wire'] / 1e6:.0f} MB", flush=True)
                time.sleep(1.0)  # the released job's tasks wind down before the next loader
        wire = {(pack, c): wire_size(data["real"]["pattern"], args, services[1], pack, c)
                for pack in (False, True) for c in (None, "AUTO")}
    finally:
        for service in services.values():
            service.stop()
        if not args.work_dir:
            shutil.rmtree(work, ignore_errors=True)

    figures = report(data, runs, wire, args, time.perf_counter() - start, load_before, uptime())
    results_file.publish(figures, "bench.data_service_benchmark", argv, args.results, "data_service_benchmark", "## tf.data service (issue 12)")
    return 0


# ---------------------------------------------------------------------------------------------
# Report


def uptime() -> str:
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "load average: " + ", ".join(f"{x:.2f}" for x in os.getloadavg())


def cpu_model() -> str:
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines() if line.startswith("Model name"))
    except (OSError, StopIteration):
        return "unknown"


def report(data, runs, wire, args, seconds, load_before, load_after) -> str:
    batch = args.batch
    side = args.crop_size or args.image_size
    ipp = data["images"] / data["products"]
    element_mb = batch * 4 * side * side * 3 / 1e6

    def med(name, key):
        return statistics.median(key(run) for run in runs[name])

    rate = {n: med(n, lambda r: batch * r["batches"] / r["wall"]) for n in runs}
    best = {n: max(batch * r["batches"] / r["wall"] for r in runs[n]) for n in runs}
    consumer_ms = {n: med(n, lambda r: 1000 * r["consumer_cpu"] / r["batches"]) for n in runs}
    worker_ms = {n: med(n, lambda r: 1000 * r["worker_cpu"] / r["batches"]) for n in runs}
    wire_mb = {n: med(n, lambda r: r["wire"] / r["batches"] / 1e6) for n in runs}
    local_ms = consumer_ms[LOCAL]
    out = [
        f"CPU: {cpu_model()}, {os.cpu_count()} cores, shared with other work. Load before: `{load_before}`; "
        f"after: `{load_after}`.",
        "",
        f"{data['products']} synthetic products ({data['images']} JPEGs, {ipp:.2f} a product, "
        f"~{data['jpeg_kb']:.1f} KB), {args.shards} shards; training stream: batch {batch}, {args.image_size} px "
        f"decodes, {'random ' + str(args.crop_size) + ' px crops' if args.crop_size else 'no crop'}; an element "
        f"is {element_mb:.1f} MB of pixels (4 slots); {args.rounds} rounds of {args.batches} timed batches per "
        f"loader after {args.warmup} untimed, loaders interleaved; {seconds:.0f} s in all. Service graph: "
        + ("`create_dataset(..., dynamic_sharding=True)` (file splits from the dispatcher)." if dynamic_sharding()
           else "`create_dataset` as it is (file shuffle and repeat on the workers: see docs/DATA_SERVICE.md)."),
        "",
        "| loader | products/s median | best round | vs local (median of rounds) | products per CPU-s "
        "(all processes) | vs local per CPU-s | consumer CPU ms/batch | worker CPU ms/batch | overhead CPU "
        "ms/batch | wire MB/batch |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    # Each round's service run against the same round's local run: the machine's other load
    # changes from minute to minute, less between two runs a few seconds apart.
    ratio = {n: statistics.median(batch * r["batches"] / r["wall"] / (batch * l["batches"] / l["wall"])
                                  for r, l in zip(runs[n], runs[LOCAL])) for n in runs}
    per_cpu = {n: batch / ((consumer_ms[n] + worker_ms[n]) / 1000) for n in runs}
    for name in runs:
        overhead = consumer_ms[name] + worker_ms[name] - local_ms
        out.append(
            f"| {name} | {rate[name]:,.0f} | {best[name]:,.0f} | **{ratio[name]:.2f}** | {per_cpu[name]:,.0f} | "
            f"{per_cpu[name] / per_cpu[LOCAL]:.2f} | {consumer_ms[name]:.0f} | {worker_ms[name]:.0f} | "
            f"{'' if name == LOCAL else f'{overhead:+.0f}'} | {'' if name == LOCAL else f'{wire_mb[name]:.1f}'} |")
    wall_overhead = {n: 1000 * batch / rate[n] - 1000 * batch / rate[LOCAL] for n in runs if n != LOCAL}
    out += ["", "Wall time per batch over the local pipeline's (negative: faster): "
            + "; ".join(f"{n}: {v:+.0f} ms" for n, v in wall_overhead.items()) + "."]
    real = data["real"]
    real_ipp = real["images"] / real["products"]
    out += ["", f"Wire bytes per product on the real sample ({real['products']} Cdiscount products, {real_ipp:.2f} "
            f"images a product, 1 worker; an uncompressed 4-slot stack is {4 * side * side * 3 / 1e3:.0f} KB): "
            + "; ".join(f"{'packed' if pack else 'padded'} {c or 'uncompressed'} {wire[pack, c] / 1e3:.0f} KB"
                        for pack, c in wire) + ". Synthetic data: "
            + "; ".join(f"{n.removeprefix('service 1w, ')} {1e3 * wire_mb[n] / batch:.0f} KB"
                        for n in runs if n.startswith("service 1w")) + " a product."]

    # Projection: 8 GPUs at GPU_IMAGES_PER_S images/s each. CPU per image from the 1-worker runs
    # (no second worker competing for the same 2 cores); bytes per real image from the real sample,
    # whose photographs (white backgrounds) compress as the catalogue's do.
    products_per_gpu = GPU_IMAGES_PER_S / FULL_DATA_IMAGES_PER_PRODUCT
    slot_mb = side * side * 3 / 1e6
    out += ["", f"Projection for {GPUS} GPUs at {GPU_IMAGES_PER_S:,} images/s each ({side} px crops; "
            f"{products_per_gpu:,.0f} products/s a GPU at the catalogue's {FULL_DATA_IMAGES_PER_PRODUCT} images a "
            "product). Network a GPU, and into an 8-GPU host:", ""]

    def network(mb_per_gpu):
        return (f"{mb_per_gpu:.0f} MB/s ({mb_per_gpu * 8 / 1e3:.1f} Gbit/s) a GPU, {GPUS * mb_per_gpu / 1e3:.1f} GB/s "
                f"({GPUS * mb_per_gpu * 8 / 1e3:.0f} Gbit/s) a host")

    out.append(f"- Real pixels, uncompressed: {GPU_IMAGES_PER_S:,} x {slot_mb * 1e3:.1f} KB = "
               f"{network(GPU_IMAGES_PER_S * slot_mb)} (the issue's ~230 MB/s a GPU); packed sends just these.")
    out.append(f"- Padded 4-slot stacks, uncompressed: {network(products_per_gpu * 4 * slot_mb)}.")
    for pack, c in (((False, "AUTO"), (True, "AUTO"))):
        per_image_kb = wire[pack, c] / real_ipp / 1e3
        out.append(f"- {'Packed' if pack else 'Padded'}, AUTO (snappy): {per_image_kb:.0f} KB a real image on the "
                   f"real sample -> {network(GPU_IMAGES_PER_S * per_image_kb / 1e3)}.")
    for workers, pack, c in SERVICE_LOADERS:
        if workers != 1:
            continue
        name = service_name(workers, pack, c)
        worker_image = worker_ms[name] / 1e3 / (batch * ipp)
        consumer_image = consumer_ms[name] / 1e3 / (batch * ipp)
        out.append(f"- CPU, {name.removeprefix('service 1w, ')}: workers {1e3 * worker_image:.2f} ms an image -> "
                   f"**{GPU_IMAGES_PER_S * worker_image:.1f} worker cores a GPU** ({GPUS * GPU_IMAGES_PER_S * worker_image:.0f} "
                   f"for {GPUS}); receiving on the trainer {1e3 * consumer_image:.2f} ms an image -> "
                   f"{GPU_IMAGES_PER_S * consumer_image:.2f} cores a GPU on the GPU host.")
    local_image = local_ms / 1e3 / (batch * ipp)
    out.append(f"- The local pipeline for comparison: {1e3 * local_image:.2f} ms CPU an image -> "
               f"{GPU_IMAGES_PER_S * local_image:.1f} cores a GPU on the GPU host itself "
               f"({GPUS * GPU_IMAGES_PER_S * local_image:.0f} for {GPUS}).")
    return "\n".join(out) + "\n"


if __name__ == "__main__":
    sys.exit(main())
