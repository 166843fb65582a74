"""The whole flow on built-in data, in under 10 minutes on 2 CPU cores (`make demo`).

1. Inputs: a learnable synthetic train BSON (3,000 products, 20 classes of which 4 are "split
   classes" whose evidence is spread over a product's images) plus the real
   data/train_example.bson, and an unlabelled synthetic test BSON with one unreadable product.
2. `python -m beam_convert` on both (train/val, and test).
3. `python train.py --flagfile=configs/cpu_tiny.flags` twice: the multi-image fusion model
   (mean_max) and the late-fusion baseline (per-image predictions averaged).
4. `python evaluate.py --split=val` for both, and `--split=test` for the fusion model: a
   submission with a row for every test product, the rejected one included.
5. Beyond one run (README section "Beyond one run", these very commands): the fusion model
   fine-tuned at 64 px with `--init_from`, a second 48 px model trained with another seed, the
   first one's best checkpoint evaluated, the two 48 px models ensembled, and two products
   predicted from their JPEG files. It prints whether the fine-tuned model beats its parent on val
   and the ensemble its better member.

Everything goes to ./demo_output/. Each step is the documented command line, run as a subprocess.
"""

import json
import os
import shutil
import subprocess
import sys
import time

import bson

import record_schema
from sample_data import synthetic
from model.model_dir import METRICS_FILE, eval_dir

REPO = os.path.dirname(os.path.abspath(__file__))
OUT = os.path.join(os.getcwd(), "demo_output")
TRAIN_PRODUCTS = 3000
TEST_PRODUCTS = 300
NUM_CLASSES = 20
NUM_SPLIT_CLASSES = 4
FUSION_MODELS = ("mean_max", "late")  # the multi-image model, then the per-image baseline
# README "Beyond one run": run here as written ("demo_output" is this demo's output folder).
BEYOND_ONE_RUN = [
    "train.py --flagfile=configs/cpu_tiny.flags --data_dir=demo_output/data --model_dir=demo_output/models/mean_max_64 "
    "--init_from=demo_output/models/mean_max --image_size=64 --epochs=2 --base_lr=0.004 --warmup_epochs=0 --seed=1",
    "train.py --flagfile=configs/cpu_tiny.flags --data_dir=demo_output/data --model_dir=demo_output/models/mean_max_seed2 "
    "--seed=2",
    "evaluate.py --data_dir=demo_output/data --model_dir=demo_output/models/mean_max_64 --split=val",
    "evaluate.py --data_dir=demo_output/data --model_dir=demo_output/models/mean_max --split=val --checkpoint=best",
    "evaluate.py --data_dir=demo_output/data --model_dir=demo_output/models/mean_max,demo_output/models/mean_max_seed2 "
    "--split=val --save_top_k=5",
    "-m model.predict --model_dir=demo_output/models/mean_max_64 "
    "--product=demo_output/jpegs/first_1.jpg,demo_output/jpegs/first_2.jpg --product=demo_output/jpegs/second_1.jpg",
]


def accuracy_on(metrics: dict, category_ids) -> dict:
    """Top-1 over the products of some categories (e.g. the synthetic split classes)."""
    rows = [metrics["by_category"].get(str(int(c)), {"products": 0, "top1": 0.0}) for c in category_ids]
    products = sum(r["products"] for r in rows)
    correct = sum(r["products"] * r["top1"] for r in rows)
    return {"products": products, "top1": correct / products if products else 0.0}


def run(step: str, *args: str) -> float:
    """Runs one documented command, streaming its output; returns its duration."""
    print(f"\n=== {step}\n$ {' '.join(args)}", flush=True)
    start = time.perf_counter()
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"}
    process = subprocess.Popen([sys.executable, *args], cwd=REPO, env=env, stdout=subprocess.PIPE,
                               stderr=subprocess.STDOUT, text=True)
    for line in process.stdout:
        # TensorFlow/absl start-up chatter says nothing about the demo.
        if not line.startswith(("W0000", "I0000", "WARNING: All log messages", "To enable the following")):
            print("  " + line, end="", flush=True)
    if process.wait():
        sys.exit(f"demo: step failed ({step}), exit status {process.returncode}")
    seconds = time.perf_counter() - start
    print(f"  [{step}: {seconds:.0f} s]", flush=True)
    return seconds


def make_inputs(inputs: str) -> tuple[list, str]:
    """Synthetic train/test BSONs, the real sample, and the category file covering both."""
    train_dir, test_dir = os.path.join(inputs, "train"), os.path.join(inputs, "test")
    os.makedirs(train_dir)
    os.makedirs(test_dir)
    summary = synthetic.write_bson(os.path.join(train_dir, "synthetic_train.bson"), TRAIN_PRODUCTS,
                                   num_classes=NUM_CLASSES, num_split_classes=NUM_SPLIT_CLASSES, seed=0,
                                   first_id=1_000_000)  # above the real sample's _ids (0..101)
    sample = os.path.join(REPO, "data", "train_example.bson")
    shutil.copy(sample, os.path.join(train_dir, "train_example.bson"))
    with open(sample, "rb") as f:
        real_ids = {doc["category_id"] for doc in bson.decode_file_iter(f)}
    categories = os.path.join(inputs, "categories.csv")
    synthetic.write_categories_csv(categories, sorted(set(summary["category_ids"]) | real_ids))

    test = os.path.join(test_dir, "synthetic_test.bson")
    synthetic.write_bson(test, TEST_PRODUCTS, num_classes=NUM_CLASSES, num_split_classes=NUM_SPLIT_CLASSES,
                         seed=1, labelled=False)
    # One product the converter must reject (its picture is not a JPEG): it still needs a row.
    with open(test, "ab") as f:
        f.write(bson.encode({"_id": 10_000_000, "imgs": [{"picture": bson.Binary(b"GIF89a not a jpeg")}]}))
    print(f"inputs: {summary['products']} synthetic train products ({summary['images']} images, "
          f"{NUM_CLASSES} classes, split classes {summary['split_category_ids']}), the 82 real sample "
          f"products, {TEST_PRODUCTS + 1} unlabelled test products -> {inputs}")
    return summary["split_category_ids"], categories


def write_jpegs(test_bson: str, folder: str) -> None:
    """Two test products as JPEG files, as a user would hold them: first_1.jpg, first_2.jpg (a
    product of 2+ pictures) and second_1.jpg."""
    os.makedirs(folder)
    with open(test_bson, "rb") as f:
        documents = list(bson.decode_file_iter(f))
    first = next(d for d in documents if len(d["imgs"]) >= 2)
    second = next(d for d in documents if d is not first)
    for name, document, count in (("first", first, 2), ("second", second, 1)):
        for i, image in enumerate(document["imgs"][:count], 1):
            with open(os.path.join(folder, f"{name}_{i}.jpg"), "wb") as f:
                f.write(image["picture"])


def beyond_one_run(times: dict) -> dict:
    """README "Beyond one run", command by command; returns the val metrics it compares."""
    write_jpegs(os.path.join(OUT, "inputs", "test", "synthetic_test.bson"), os.path.join(OUT, "jpegs"))
    names = ["fine-tune at 64 px", "train mean_max again, another seed", "evaluate the fine-tuned model",
             "evaluate the best checkpoint", "ensemble the two 48 px models", "predict"]
    for name, command in zip(names, BEYOND_ONE_RUN):
        times[name] = run(name, *[arg.replace("demo_output", OUT) for arg in command.split()])
    models = os.path.join(OUT, "models")
    metrics = {}
    for key, folder in (("parent", "mean_max/eval_val"), ("fine-tuned", "mean_max_64/eval_val"),
                        ("best", "mean_max/eval_val_best"), ("ensemble", "mean_max/eval_val_ensemble")):
        with open(os.path.join(models, folder, METRICS_FILE)) as f:
            metrics[key] = json.load(f)
    return metrics


def main() -> None:
    start = time.perf_counter()
    if os.path.exists(OUT):
        shutil.rmtree(OUT)
    inputs, data, test_data, models = (os.path.join(OUT, d) for d in ("inputs", "data", "test_data", "models"))
    split_ids, categories = make_inputs(inputs)
    times = {}

    times["convert"] = run("convert train+val", "-m", "beam_convert", f"--input={inputs}/train/*.bson",
                           f"--output_dir={data}", f"--categories={categories}", "--val_fraction=0.15")
    times["convert"] += run("convert test", "-m", "beam_convert", f"--input={inputs}/test/*.bson",
                            f"--output_dir={test_data}", f"--categories={categories}")

    results = {}
    for fusion in FUSION_MODELS:
        model_dir = os.path.join(models, fusion)
        times[f"train {fusion}"] = run(f"train {fusion}", "train.py", "--flagfile=configs/cpu_tiny.flags",
                                       f"--data_dir={data}", f"--model_dir={model_dir}", f"--fusion={fusion}")
        times[f"evaluate {fusion}"] = run(f"evaluate {fusion} on val", "evaluate.py", f"--data_dir={data}",
                                          f"--model_dir={model_dir}", "--split=val")
        with open(os.path.join(eval_dir(model_dir, "val"), METRICS_FILE)) as f:
            results[fusion] = json.load(f)
    fusion_dir = os.path.join(models, FUSION_MODELS[0])
    times["submission"] = run("test submission", "evaluate.py", f"--data_dir={test_data}",
                              f"--model_dir={fusion_dir}", "--split=test")
    beyond = beyond_one_run(times)

    with open(os.path.join(data, record_schema.LABELS_FILE)) as f:
        num_classes = sum(1 for _ in f) - 1
    with open(os.path.join(eval_dir(fusion_dir, "test"), METRICS_FILE)) as f:
        submission = json.load(f)["submission"]
    print("\n=== results (val split)")
    print(f"{'model':<28}{'top-1':>8}{'top-5':>8}{'split classes top-1':>22}")
    for fusion, metrics in results.items():
        split = accuracy_on(metrics, split_ids)
        name = "multi-image fusion (" + fusion + ")" if fusion != "late" else "late fusion (per image)"
        print(f"{name:<28}{metrics['top1']:>8.3f}{metrics['top5']:>8.3f}{split['top1']:>15.3f} of {split['products']}")
    print(f"chance: top-1 {1 / num_classes:.3f} ({num_classes} classes). Split classes: each image alone is "
          "equally likely under both classes of its pair, so a model that cannot compare a product's images "
          "(late fusion) is expected at ~0.5 there")
    fused = accuracy_on(results[FUSION_MODELS[0]], split_ids)["top1"]
    late = accuracy_on(results["late"], split_ids)["top1"]
    print(f"multi-image fusion {'beats' if fused > late else 'does NOT beat'} late fusion on the split classes "
          f"({fused:.3f} vs {late:.3f})")

    parent, tuned, ensemble = (beyond[key]["top1"] for key in ("parent", "fine-tuned", "ensemble"))
    members = [member["top1"] for member in beyond["ensemble"]["members"]]
    print("\n=== beyond one run (val top-1)")
    print(f"fine-tuned at 64 px from the 48 px model (2 epochs): {tuned:.3f} (parent {parent:.3f})")
    print(f"best checkpoint of the 48 px model: {beyond['best']['top1']:.3f} (final {parent:.3f})")
    print(f"ensemble of the two 48 px models (two seeds): {ensemble:.3f} (members "
          f"{', '.join(f'{m:.3f}' for m in members)})")
    print(f"verdicts (BUILD_NOTES: measured, not enforced: 383 val products, 0.003 a product): fine-tuned "
          f"{'>=' if tuned >= parent else '<'} parent; ensemble {'>=' if ensemble >= max(members) else '<'} "
          "its better member")

    print("\n=== where everything is")
    print(f"converted data:    {data} (train/val), {test_data} (test)")
    for fusion in FUSION_MODELS:
        d = os.path.join(models, fusion)
        print(f"model {fusion + ':':<11} {d}/model.keras, {d}/export/ (SavedModel: JPEG bytes -> top-5 "
              f"category ids), {d}/eval_val/metrics.json + report.png")
    print(f"submission:        {fusion_dir}/eval_test/submission.csv ({submission['rows']} rows, "
          f"{submission['rejected_with_fallback']} rejected product(s) given the most frequent training "
          f"category {submission['fallback_category_id']})")
    print(f"TensorBoard:       tensorboard --logdir {models}")
    total = time.perf_counter() - start
    print("time: " + ", ".join(f"{k} {v:.0f} s" for k, v in times.items()) + f"; total {total:.0f} s")
    if fused <= late:
        sys.exit("demo: the multi-image model did not beat late fusion on the split classes")



if __name__ == "__main__":
    main()
