"""Bytes a train.py run reads (its process's `rchar`, /proc/self/io), printed at exit: the start-up
cost of checking shards (issue 25). Runs train.py in this process, with its flags:

    python -m bench.start_reads --flagfile=configs/cpu_tiny.flags --data_dir=D --model_dir=M \\
        --epochs=1 --steps_per_epoch=2

Compare the figure with the data folder's bytes (`du -sb D`); BUILD_NOTES "Start-up reads".
"""

import atexit
import os
import runpy
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _report() -> None:
    with open("/proc/self/io") as f:
        counters = dict(line.strip().split(": ") for line in f)
    print(f"start_reads: rchar {int(counters['rchar']):,} bytes", file=sys.stderr, flush=True)


if __name__ == "__main__":
    atexit.register(_report)
    sys.argv = ["train.py", *sys.argv[1:]]
    runpy.run_path(os.path.join(REPO, "train.py"), run_name="__main__")
