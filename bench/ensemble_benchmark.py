"""Does an ensemble of two models score at least as well as the better one? (issue 16, item 3)

    python -m bench.ensemble_benchmark [--work_dir=/tmp/ensemble_bench] [--runs=3] [--products=3000]
        [--epochs=5] [--results=bench/RESULTS_eval.md]

Demo-like data (demo.py's synthetic generator: 20 classes of which 4 split classes, converted by
beam_convert with a 15 % val split). Each run trains two models with configs/cpu_tiny.flags
(48 px, mean_max fusion) that differ only in --seed, evaluates each on val, then their ensemble
with the arithmetic and the geometric mean: the same val products, one evaluate() call each.
The data and the models are kept in --work_dir (bench/dup_lookup_benchmark.py reuses them);
a model already trained there is not trained again.
"""

from __future__ import annotations

import argparse
import os
import subprocess
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

from bench import results  # noqa: E402

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NAME = "ensemble"
HEADING = "# Evaluation benchmarks (issue 16): ensembles and the duplicate lookup"
RESULTS = os.path.join(REPO, "bench", "RESULTS_eval.md")


def prepare_data(work_dir: str, products: int) -> str:
    """demo.py's synthetic train BSON converted with a val split; done once per work_dir."""
    data = os.path.join(work_dir, "data")
    if os.path.exists(os.path.join(data, "metadata.json")):
        return data
    from sample_data import synthetic

    inputs = os.path.join(work_dir, "inputs")
    os.makedirs(inputs, exist_ok=True)
    bson_path = os.path.join(inputs, "synthetic_train.bson")
    summary = synthetic.write_bson(bson_path, products, num_classes=20, num_split_classes=4, seed=0,
                                   first_id=1_000_000)
    categories = os.path.join(inputs, "categories.csv")
    synthetic.write_categories_csv(categories, sorted(set(summary["category_ids"])))
    subprocess.run([sys.executable, "-m", "beam_convert", f"--input={bson_path}", f"--output_dir={data}",
                    f"--categories={categories}", "--val_fraction=0.15"], cwd=REPO, check=True)
    return data


def train_model(work_dir: str, data: str, name: str, *flags: str) -> str:
    """train.py with configs/cpu_tiny.flags (and `flags`) into work_dir/models/name, unless done."""
    model_dir = os.path.join(work_dir, "models", name)
    if not os.path.exists(os.path.join(model_dir, "train_state.json")):
        subprocess.run([sys.executable, "train.py", "--flagfile=configs/cpu_tiny.flags", f"--data_dir={data}",
                        f"--model_dir={model_dir}", "--sample_products=0", "--noinput_check", *flags],
                       cwd=REPO, check=True)
    return model_dir


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", default="/tmp/ensemble_bench")
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--products", type=int, default=3000)
    parser.add_argument("--epochs", type=int, default=5)
    parser.add_argument("--results", default=RESULTS, help="results file ('' to only print)")
    args = parser.parse_args(argv)

    from model.config import EvalConfig
    from model.evaluation import evaluate as evaluation

    data = prepare_data(args.work_dir, args.products)
    rows = []
    for run in range(args.runs):
        members = [train_model(args.work_dir, data, f"run{run}_seed{seed}", f"--seed={seed}", f"--epochs={args.epochs}")
                   for seed in (2 * run + 1, 2 * run + 2)]
        scores = {}
        for name, model_dir, options in (
                ("A", members[0], {}), ("B", members[1], {}),
                ("A+B arithmetic", ",".join(members), {}),
                ("A+B geometric", ",".join(members), {"ensemble_mean": "geometric"})):
            out = os.path.join(args.work_dir, "eval", f"run{run}", name.replace(" ", "_").replace("+", ""))
            summary = evaluation.evaluate(EvalConfig(data_dir=data, model_dir=model_dir, split="val", output_dir=out,
                                                     **options), log=lambda *_: None)
            scores[name] = (summary["top1"], summary["top5"], summary["products"])
        rows.append(scores)
        print(f"run {run + 1}: " + ", ".join(f"{k} {v[0]:.4f}" for k, v in scores.items()), flush=True)

    lines = [f"Val top-1 / top-5 ({rows[0]['A'][2]} products, {args.products} synthetic products, "
             f"configs/cpu_tiny.flags --epochs={args.epochs}; A and B differ in --seed only):", "",
             "| run | A | B | better of A, B | A+B arithmetic | A+B geometric | arithmetic - better |",
             "|---|---|---|---|---|---|---|"]
    gains = []
    for run, s in enumerate(rows):
        better = max(s["A"][0], s["B"][0])
        gains.append(s["A+B arithmetic"][0] - better)
        lines.append(f"| {run + 1} | {s['A'][0]:.4f} / {s['A'][1]:.4f} | {s['B'][0]:.4f} / {s['B'][1]:.4f} | "
                     f"{better:.4f} | {s['A+B arithmetic'][0]:.4f} / {s['A+B arithmetic'][1]:.4f} | "
                     f"{s['A+B geometric'][0]:.4f} / {s['A+B geometric'][1]:.4f} | {gains[-1]:+.4f} |")
    lines += ["", f"Arithmetic ensemble minus the better member, top-1: mean {sum(gains) / len(gains):+.4f}, "
              f"min {min(gains):+.4f}, over {len(gains)} runs.", ""]
    results.publish("\n".join(lines), "bench.ensemble_benchmark", argv, args.results, NAME, HEADING)


if __name__ == "__main__":
    main()
