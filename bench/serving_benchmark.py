"""What flip TTA costs a served call, and what `python -m model.predict` takes for one product (issue 16).

    python -m bench.serving_benchmark [--configs=tiny:48,xception:180] [--batch=32] [--rounds=5]
        [--results=bench/RESULTS_serving.md]

For each backbone:size, one model (random weights: the cost does not depend on them; 5,270
classes, mean_max fusion, packed) is exported twice, without and with flip TTA, and both
SavedModels' serving_default are called on the same batch of real JPEG bytes (the first `batch`
products of data/train_example.bson, 1-4 pictures each). The machine is shared, so the two alternate:
`rounds` rounds, each one timed call of each after a warm-up call; the table gives the median ms a
call and the median of the rounds' flip/plain ratios (each round runs both back to back).

Then the command: `python -m model.predict --json` on one product of the tiny export, wall time
from process start to exit (TensorFlow's import and the SavedModel's load included), median of
`rounds` runs.
"""

from __future__ import annotations

import argparse
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import numpy as np  # noqa: E402
import tensorflow as tf  # noqa: E402

from bench.results import publish  # noqa: E402
from model import export  # noqa: E402
from model.input_pipeline import labels as labels_lib  # noqa: E402
from model.network.multi_image import ModelConfig, build_model  # noqa: E402
from tests.record_helpers import REPO, sample_documents  # noqa: E402

NUM_CLASSES = 5270
RESULTS = pathlib.Path(__file__).resolve().parent / "RESULTS_serving.md"


def fake_labels(k: int) -> labels_lib.Labels:
    return labels_lib.Labels(category_ids=np.arange(k, dtype=np.int64) + 1000000000, level1=("",) * k,
                             level2=("",) * k, level3=tuple(f"class {i}" for i in range(k)),
                             level1_index=np.zeros(k, np.int64), level2_index=np.zeros(k, np.int64),
                             level1_names=("",), level2_names=("/",))


def batch_of(count: int):
    pictures = [[img["picture"] for img in d["imgs"]] for d in sample_documents()[:count]]
    images = tf.constant([p + [b""] * (4 - len(p)) for p in pictures])
    mask = tf.constant([[1.0] * len(p) + [0.0] * (4 - len(p)) for p in pictures], tf.float32)
    return images, mask, sum(map(len, pictures))


def time_config(backbone: str, size: int, folder: str, images, mask, rounds: int) -> dict:
    model = build_model(ModelConfig(num_classes=NUM_CLASSES, image_size=size, backbone=backbone))
    serve = {}
    for flip_tta in (False, True):
        path = os.path.join(folder, f"{backbone}_{size}_{flip_tta}")
        export.export_serving_model(model, fake_labels(NUM_CLASSES), path, image_size=size, flip_tta=flip_tta)
        serve[flip_tta] = tf.saved_model.load(path).signatures["serving_default"]
        serve[flip_tta](images=images, mask=mask)  # warm-up
    times = {False: [], True: []}
    for _ in range(rounds):
        for flip_tta in (False, True):
            start = time.perf_counter()
            serve[flip_tta](images=images, mask=mask)["probabilities"].numpy()
            times[flip_tta].append(time.perf_counter() - start)
    ratios = [f / p for f, p in zip(times[True], times[False])]
    return {"plain_ms": 1000 * statistics.median(times[False]), "flip_ms": 1000 * statistics.median(times[True]),
            "ratio": statistics.median(ratios), "path": os.path.join(folder, f"{backbone}_{size}_False")}


def time_command(export_path: str, folder: str, rounds: int) -> float:
    """Median wall seconds of `python -m model.predict --json` on one product (a model_dir around the export)."""
    model_dir = os.path.join(folder, "model_dir")
    os.makedirs(model_dir, exist_ok=True)
    if not os.path.exists(os.path.join(model_dir, "export")):
        os.symlink(export_path, os.path.join(model_dir, "export"))
    import record_schema

    labels = fake_labels(NUM_CLASSES)
    with open(os.path.join(model_dir, record_schema.LABELS_FILE), "w") as f:
        f.write(",".join(record_schema.LABELS_HEADER) + "\n")
        f.writelines(f"{i},{c},,,{name}\n" for i, (c, name) in enumerate(zip(labels.category_ids, labels.level3)))
    picture = os.path.join(folder, "p.jpg")
    with open(picture, "wb") as f:
        f.write(sample_documents()[0]["imgs"][0]["picture"])
    seconds = []
    for _ in range(rounds):
        start = time.perf_counter()
        subprocess.run([sys.executable, "-m", "model.predict", f"--model_dir={model_dir}", f"--product={picture}",
                        "--json"], check=True, capture_output=True, cwd=REPO)
        seconds.append(time.perf_counter() - start)
    return statistics.median(seconds)


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--configs", default="tiny:48,xception:180")
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--results", default=str(RESULTS))
    args = parser.parse_args(argv)
    images, mask, pictures = batch_of(args.batch)
    lines = [f"{args.batch} products, {pictures} pictures a call; median of {args.rounds} rounds", "",
             "| backbone | size | plain ms a call | flip TTA ms a call | flip / plain (median of rounds) |",
             "|---|---|---|---|---|"]
    with tempfile.TemporaryDirectory() as folder:
        command_seconds = None
        for config in args.configs.split(","):
            backbone, size = config.split(":")
            result = time_config(backbone, int(size), folder, images, mask, args.rounds)
            lines.append(f"| {backbone} | {size} | {result['plain_ms']:.0f} | {result['flip_ms']:.0f} | "
                         f"{result['ratio']:.2f} |")
            if backbone == "tiny" and command_seconds is None:
                command_seconds = time_command(result["path"], folder, args.rounds)
        if command_seconds is not None:
            lines += ["", f"`python -m model.predict --json`, one product, tiny export: {command_seconds:.1f} s "
                      "wall from process start to exit (median)"]
    publish("\n".join(lines) + "\n", "bench.serving_benchmark", argv, args.results, "serving",
            "# Serving: flip TTA and the predict command")


if __name__ == "__main__":
    main()
