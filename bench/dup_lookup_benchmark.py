"""Image-level against product-level duplicate lookup (issue 16, item 4) on a labelled split where
some val pictures also appear in train.

    python -m bench.dup_lookup_benchmark [--work_dir=/tmp/ensemble_bench] [--share=0.3] [--seeds=3]
        [--results=bench/RESULTS_eval.md]

The data and model of bench/ensemble_benchmark.py (trained there when missing): demo-like
synthetic products converted with a leak-free 15 % val split, a configs/cpu_tiny.flags model.
Since the converter keeps every picture of a val product out of train, the overlap is made in the
digest table (train_image_digests.npz, what the lookup reads): for `share` of the val products,
one of their pictures drawn at random (among those in no other val product) is added to the
training folder's table, with

- same: the product's own category;
- conflicting: another category, drawn at random;
- mixed: 60 % same, 20 % conflicting, 20 % seen twice in train, once under each.

Each case runs one evaluate(--dup_lookup) on val, which measures no lookup, the product-level
override and the image-level fusion on the same predictions; `seeds` draws of the matched products.
"""

from __future__ import annotations

import argparse
import collections
import os
import shutil
import statistics

import numpy as np

from bench import ensemble_benchmark, results

NAME = "dup_lookup"
CASES = ("same", "conflicting", "mixed")


def val_products(data: str) -> tuple[list, dict, dict]:
    """(product ids in order, product_id -> real picture digests, product_id -> category_id)."""
    import tensorflow as tf

    import record_schema
    from model.evaluation import duplicates
    from model.input_pipeline import data_folder

    pattern = data_folder.split_pattern(data, "val")
    digests = duplicates.read_record_digests(pattern)
    spec = {k: v for k, v in record_schema.feature_spec().items() if k in ("product_id", "category_id")}
    categories = {}
    files = sorted(tf.io.gfile.glob(pattern))
    for batch in tf.data.TFRecordDataset(files).batch(512).map(lambda s: tf.io.parse_example(s, spec)).as_numpy_iterator():
        for pid, category in zip(batch["product_id"][:, 0], batch["category_id"][:, 0]):
            categories[int(pid)] = int(category)
    return list(categories), digests, categories


def overlap_table(base: dict, ids, digests, categories, case: str, share: float, seed: int) -> tuple[dict, int, int]:
    """The training table plus, for `share` of the val products, one of their pictures (see module
    doc); also how many products were given a match, and how many of those have several pictures."""
    rng = np.random.default_rng(seed)
    category_ids = sorted(set(categories.values()))
    # Only pictures found in no other val product: the added row then matches the chosen product
    # alone, and "same" and "conflicting" mean what they say (the synthetic data repeats pictures
    # across products, some across the two classes of a split pair).
    seen = collections.Counter(d for pid in ids for d in set(digests[pid]))
    unique = {pid: [d for d in digests[pid] if seen[d] == 1] for pid in ids}
    candidates = [pid for pid in ids if unique[pid]]
    chosen = rng.choice(len(candidates), size=min(len(candidates), int(round(share * len(ids)))), replace=False)
    rows = []
    for i in chosen.tolist():
        pid = candidates[i]
        digest = unique[pid][rng.integers(len(unique[pid]))]
        true = categories[pid]
        other = rng.choice([c for c in category_ids if c != true])
        kind = case if case != "mixed" else rng.choice(["same", "conflicting", "both"], p=[0.6, 0.2, 0.2])
        if kind in ("same", "both"):
            rows.append((digest, true))
        if kind in ("conflicting", "both"):
            rows.append((digest, int(other)))
    table = {
        "digest": np.concatenate([base["digest"], np.array([d for d, _ in rows], np.int64)]),
        "category_id": np.concatenate([base["category_id"], np.array([c for _, c in rows], np.int64)]),
        "count": np.concatenate([base["count"], np.ones(len(rows), np.int64)]),
    }
    return table, len(chosen), sum(len(digests[candidates[i]]) > 1 for i in chosen.tolist())


def main(argv=None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--work_dir", default="/tmp/ensemble_bench")
    parser.add_argument("--products", type=int, default=3000)
    parser.add_argument("--share", type=float, default=0.3)
    parser.add_argument("--seeds", type=int, default=3)
    parser.add_argument("--results", default=ensemble_benchmark.RESULTS, help="results file ('' to only print)")
    args = parser.parse_args(argv)

    import record_schema
    from model.config import EvalConfig
    from model.evaluation import evaluate as evaluation

    data = ensemble_benchmark.prepare_data(args.work_dir, args.products)
    model_dir = ensemble_benchmark.train_model(args.work_dir, data, "run0_seed1", "--seed=1", "--epochs=5")
    ids, digests, categories = val_products(data)
    with np.load(os.path.join(data, record_schema.IMAGE_DIGESTS_FILE)) as f:
        base = {k: f[k] for k in f.files}
    multi = sum(len(d) > 1 for d in digests.values())
    found = {case: [] for case in CASES}
    for case in CASES:
        for seed in range(args.seeds):
            train_dir = os.path.join(args.work_dir, "dup", f"{case}_{seed}")
            os.makedirs(train_dir, exist_ok=True)
            table, matched, several = overlap_table(base, ids, digests, categories, case, args.share, seed)
            np.savez(os.path.join(train_dir, record_schema.IMAGE_DIGESTS_FILE), **table)
            out = os.path.join(train_dir, "eval")
            shutil.rmtree(out, ignore_errors=True)
            summary = evaluation.evaluate(EvalConfig(data_dir=data, model_dir=model_dir, split="val", output_dir=out,
                                                     dup_lookup=True, train_data_dir=train_dir), log=lambda *_: None)
            d = summary["dup_lookup"]
            if d["image_level"]["matched"] != matched:
                raise SystemExit(f"{case} seed {seed}: {d['image_level']['matched']} products matched, {matched} planted")
            found[case].append((d["top1_without"], d["product_level"]["top1"], d["image_level"]["top1"],
                                d["image_level"]["matched"], several))
            print(f"{case} seed {seed}: none {d['top1_without']:.4f}, product {d['product_level']['top1']:.4f}, "
                  f"image {d['image_level']['top1']:.4f} ({matched} matched, {several} with several pictures)", flush=True)

    several = [r[4] for rows in found.values() for r in rows]
    lines = [f"Val top-1, {len(ids)} products ({multi} with several pictures); {args.share:.0%} of them with one "
             f"picture in the training table ({min(several)}-{max(several)} of those with several pictures); "
             f"mean over {args.seeds} draws (min..max):", "",
             "| training labels of the matched picture | no lookup | product level | image level | "
             "image - product |", "|---|---|---|---|---|"]

    def cell(values):
        return f"{statistics.mean(values):.4f} ({min(values):.4f}..{max(values):.4f})"

    for case in CASES:
        rows = found[case]
        lines.append(f"| {case} | {cell([r[0] for r in rows])} | {cell([r[1] for r in rows])} | "
                     f"{cell([r[2] for r in rows])} | {cell([r[2] - r[1] for r in rows])} |")
    lines.append("")
    results.publish("\n".join(lines), "bench.dup_lookup_benchmark", argv, args.results, NAME,
                    ensemble_benchmark.HEADING)


if __name__ == "__main__":
    main()
