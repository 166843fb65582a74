"""Planted bugs: each is a small change to the code that some test exists to catch. This plants
each one in a scratch copy of the checkout, runs the tests named for it and says whether they
failed (caught) or passed (missed). Run it before thinning a test, and after: nothing caught
before may go uncaught (BUILD_NOTES.md "Planted bugs").

    python -m bench.planted_bugs [--only=ID,ID] [--checkout=DIR]

A plant whose text is not found exactly once in its file is reported as "stale": the code moved,
and the plant must be written again for it.
"""

from __future__ import annotations

import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Plant:
    id: str
    area: str
    what: str  # the bug, in words
    path: str  # the file planted in, from the checkout's root
    old: str  # text found exactly once in the file...
    new: str  # ...and what it becomes
    tests: tuple[str, ...]  # pytest node ids expected to fail
    # The same bug in the code as it stood before a refactor (path, old, new): planted where the
    # text above is not found, so one table runs on the checkout before and after.
    earlier: tuple[str, str, str] | None = None


# fmt: off
PLANTS = (
    Plant("P1", "pipeline", "evaluation files read out of name order",
          "model/input_pipeline/sources.py", "files = sorted(tf.io.gfile.glob(file_pattern))",
          "files = sorted(tf.io.gfile.glob(file_pattern), reverse=True)",
          ("tests/test_model_input_pipeline.py",),
          earlier=("model/input_pipeline/dataset.py", "files = sorted(tf.io.gfile.glob(file_pattern))",
                   "files = sorted(tf.io.gfile.glob(file_pattern), reverse=True)")),
    Plant("N1", "network", "max fusion lets padded slots win",
          "model/network/fusion.py", "pooled = ops.max(ops.where(real, features, lowest), axis=1)",
          "pooled = ops.max(features, axis=1)", ("tests/test_model_network.py",)),
    Plant("T1", "training", "learning rate not scaled with the global batch",
          "model/training/optimization.py", "peak = cfg.base_lr * cfg.batch_size / 256.0", "peak = cfg.base_lr",
          ("tests/test_model_training_optimization.py",)),
    Plant("R1", "resume", "random states (crops, mirrors) not restored from the backup",
          "model/training/random_states.py",
          "        variable.assign(keras.ops.convert_to_tensor(state, dtype=variable.dtype))", "        pass",
          ("tests/test_model_training_callbacks.py", "tests/test_model_training_run.py")),
    Plant("E1", "evaluation", "top-5 counts only the first class",
          "model/evaluation/metrics.py", "top5 = (top_classes[:, :5] == true_classes[:, None])",
          "top5 = (top_classes[:, :1] == true_classes[:, None])", ("tests/test_model_evaluation.py",)),
    Plant("E2", "evaluation", "rejected products get no submission row",
          "model/evaluation/submission.py", "        elif int(pid) not in rows:\n            rows[int(pid)] = fallback",
          "        elif False:\n            rows[int(pid)] = fallback", ("tests/test_model_evaluation.py",)),
    Plant("C1", "commands", "train.py drops --skip_corrupt_records (the flag never reaches the run)",
          "model/cli.py", "for field in dataclasses.fields(config_class)})",
          "for field in dataclasses.fields(config_class) if field.name != 'skip_corrupt_records'})",
          ("tests/test_model_config.py",
           "tests/test_model_data_faults.py::test_commands_stop_on_a_truncated_shard_with_one_line_and_skip_it_when_asked"),
          earlier=("train.py", "for f in dataclasses.fields(config.TrainConfig)})",
                   "for f in dataclasses.fields(config.TrainConfig) if f.name != 'skip_corrupt_records'})")),
    Plant("P2", "pipeline", "a resumed seeded stream skips one record too few",
          "model/input_pipeline/sources.py", "first_pass, skip = divmod(skip_records, per_pass)",
          "first_pass, skip = divmod(skip_records, per_pass)\n        skip = max(0, skip - 1)",
          ("tests/test_model_input_pipeline.py",),
          earlier=("model/input_pipeline/dataset.py", "first_pass, skip = divmod(skip_records, per_pass)",
                   "first_pass, skip = divmod(skip_records, per_pass)\n        skip = max(0, skip - 1)")),
    Plant("R2", "resume", "a resumed run's stream starts one step late",
          "model/training/inputs.py", "StreamStart(start_batch, records_per_file)",
          "StreamStart(start_batch + replicas_fed, records_per_file)",
          ("tests/test_model_training_resume.py",),
          earlier=("model/training/inputs.py", "start_batch=start_batch, record_counts=record_counts,",
                   "start_batch=start_batch + replicas_fed, record_counts=record_counts,")),
    Plant("S1", "serving", "the flip-TTA export averages the picture with itself",
          "model/export.py", "mirrored = _probabilities(model, tf.reverse(decoded, axis=[3]), mask)",
          "mirrored = _probabilities(model, decoded, mask)", ("tests/test_model_export.py",)),
    Plant("E3", "evaluation", "ensemble weights ignored (every member weighs the same)",
          "model/evaluation/ensemble.py", "    weights = weights / weights.sum()\n",
          "    weights = np.ones_like(weights) / len(weights)\n", ("tests/test_model_evaluation_ensemble.py",)),
    Plant("C2", "commands", "model.predict exits 0 when a product was not answered",
          "model/commands/predict.py", "return 1 if failed else 0", "return 0",
          ("tests/test_model_predict.py",),
          earlier=("model/predict.py", "return 1 if failed else 0", "return 0")),
    Plant("C3", "commands", "evaluate.py exits 1 on SIGTERM instead of 143",
          "model/commands/evaluate.py", "        sys.exit(128 + stop.signum)", "        sys.exit(1)",
          ("tests/test_model_data_faults.py::test_sigterm_stops_an_evaluation_cleanly",),
          earlier=("evaluate.py", "        sys.exit(128 + stop.signum)", "        sys.exit(1)")),
    Plant("C4", "commands", "train.py exits 0 on SIGTERM",
          "model/commands/train.py", "        sys.exit(128 + stop.signum)", "        sys.exit(0)",
          ("tests/test_model_training_run.py::test_sigterm_stops_at_a_step_with_its_own_backup_in_one_line",),
          earlier=("train.py", "        sys.exit(128 + stop.signum)", "        sys.exit(0)")),
    Plant("D1", "data faults", "a damaged shard read past without --skip_corrupt_records",
          "model/input_pipeline/shards.py", "            if not skip_corrupt_records:\n",
          "            if False:\n",
          ("tests/test_model_data_faults.py", "tests/test_model_input_shards.py")),
)
# fmt: on


def scratch_copy(checkout: str) -> str:
    target = tempfile.mkdtemp(prefix="planted-")
    shutil.copytree(checkout, target, dirs_exist_ok=True,
                    ignore=shutil.ignore_patterns(".git", ".venv", "__pycache__", "demo_output", "*.egg-info"))
    return target


def plant(copy: str, bug: Plant) -> bool:
    for relative, old, new in [(bug.path, bug.old, bug.new), *([bug.earlier] if bug.earlier else [])]:
        path = os.path.join(copy, relative)
        text = open(path).read() if os.path.exists(path) else ""
        if text.count(old) == 1:
            with open(path, "w") as f:
                f.write(text.replace(old, new))
            return True
    return False


def verdict(checkout: str, bug: Plant) -> tuple[str, str, float]:
    """(caught, MISSED, stale or error; the first test that failed; seconds)."""
    copy = scratch_copy(checkout)
    start = time.time()
    try:
        if not plant(copy, bug):
            return "stale", "", 0.0
        tests = [t for t in bug.tests if os.path.exists(os.path.join(copy, t.split("::")[0]))]  # earlier trees lack some
        run = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:xdist", "-rf", *tests],
                             cwd=copy, capture_output=True, text=True, env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
        failed = next((line.split()[1] for line in run.stdout.splitlines() if line.startswith("FAILED ")), "")
        result = {0: "MISSED", 1: "caught"}.get(run.returncode, f"error (pytest exit {run.returncode})")
        return result, failed.split(" - ")[0], time.time() - start
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--only", default="", help="comma-separated plant ids (default: all)")
    parser.add_argument("--checkout", default=REPO, help="the checkout to plant in (default: this one)")
    args = parser.parse_args()
    chosen = [b for b in PLANTS if not args.only or b.id in args.only.split(",")]
    missed = 0
    print("| id | area | bug planted | verdict | first failing test | seconds |\n|---|---|---|---|---|---|")
    for bug in chosen:
        result, failed, seconds = verdict(args.checkout, bug)
        missed += result != "caught"
        print(f"| {bug.id} | {bug.area} | {bug.what} (`{bug.path}`) | {result} | `{failed}` | {seconds:.0f} |",
              flush=True)
    return 1 if missed else 0


if __name__ == "__main__":
    sys.exit(main())
