"""How evaluate.py ends when SIGTERM comes at a random moment of its prediction (model/signals.py).

    python -m bench.signal_stops [--runs=40] [--max_delay=0.6] [--work_dir=/tmp/signal_stops]

Trains a tiny model on the test helpers' sample folder once (kept in work_dir), then runs
`evaluate.py --batch_size=1` `runs` times, each sent SIGTERM a uniform random 0..max_delay s after
it prints "Evaluating ", and counts the exit codes: 143 is the clean stop, 0 an evaluation that
finished first; anything else (1: an error, -6: an abort) is printed with its stderr's end.
Not a test: one run of the race proves nothing either way, 40 show the rate.
"""

from __future__ import annotations

import argparse
import collections
import os
import random
import signal
import subprocess
import sys
import time

from tests.record_helpers import REPO, write_data_dir


def tiny_model(work_dir: str) -> tuple[str, str]:
    """(test folder, model_dir), trained when missing."""
    model_dir, test = os.path.join(work_dir, "model"), os.path.join(work_dir, "test")
    if not os.path.exists(os.path.join(model_dir, "model.keras")):
        from model import config
        from model.training import loop

        data = write_data_dir(os.path.join(work_dir, "data"), shards=3)
        loop.train(config.TrainConfig(data_dir=data, model_dir=model_dir, epochs=1, steps_per_epoch=2,
                                      backbone="tiny", image_size=32, batch_size=8, sample_products=0,
                                      bn_recalibration_steps=1, warmup_epochs=0.5, fusion="mean", input_check=False))
        write_data_dir(test, shards=3, val_name="test")
    return test, model_dir


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--max_delay", type=float, default=0.6)
    parser.add_argument("--work_dir", default="/tmp/signal_stops")
    args = parser.parse_args()
    test, model_dir = tiny_model(args.work_dir)
    codes = collections.Counter()
    for i in range(args.runs):
        run = subprocess.Popen([sys.executable, "evaluate.py", f"--data_dir={test}", f"--model_dir={model_dir}",
                                "--split=test", f"--output_dir={args.work_dir}/eval-{i}", "--batch_size=1"],
                               cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                               env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"})
        run.stdout.readline()
        time.sleep(random.uniform(0, args.max_delay))
        run.send_signal(signal.SIGTERM)
        _, err = run.communicate(timeout=120)
        codes[run.returncode] += 1
        if run.returncode not in (0, 128 + signal.SIGTERM):
            print(f"run {i}: exit {run.returncode}\n{err[-1500:]}", flush=True)
    print(f"{args.runs} runs, exit codes: " + ", ".join(f"{code}: {n}" for code, n in sorted(codes.items())))


if __name__ == "__main__":
    main()
