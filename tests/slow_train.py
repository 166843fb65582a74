"""train.py with a pause after every training step: a run slow enough to be killed mid-epoch.

    [TRACE_BATCHES=FILE] [HOLD_AFTER_STEP=N] python tests/slow_train.py SECONDS_PER_STEP [train.py flags ...]

A test aid, kept out of the production code: it adds one callback through the library's
`extra_callbacks` and is otherwise exactly train.py's command. With TRACE_BATCHES, every batch
the training streams make (a traced source given as `training_batches`) is also logged to FILE, one line each: "PIPELINE BATCH ID,ID,...",
BATCH counted from the stream's beginning (so a resumed stream's first line is its start step).
With HOLD_AFTER_STEP, the run stops still once optimizer step N is done (its backup written: the
built-in callbacks run first) until it is killed, HOLD_SECONDS (300) at most: a kill at exactly
that step, however loaded the machine, and no slowed step before it; with HOLD_FILE as well, that
file is created once the run holds (what a test waits for: the message alone reaches the pipe
at a moment the test cannot see).
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECONDS_PER_STEP = float(sys.argv.pop(1))

import keras  # noqa: E402

from model.commands import launch, train  # noqa: E402
from model.training import loop  # noqa: E402


HOLD_AFTER_STEP = int(os.environ.get("HOLD_AFTER_STEP", "0"))


class SlowSteps(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        time.sleep(SECONDS_PER_STEP)
        if HOLD_AFTER_STEP and int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) == HOLD_AFTER_STEP:
            print(f"Holding after optimizer step {HOLD_AFTER_STEP} until killed", flush=True)
            if os.environ.get("HOLD_FILE"):
                open(os.environ["HOLD_FILE"], "w").close()
            time.sleep(float(os.environ.get("HOLD_SECONDS", "300")))


def _append_to(path):
    def record(pipeline, batch, ids):
        with open(path, "a") as f:
            f.write(f"{pipeline} {batch} {','.join(str(i) for i in ids)}\n")

    return record


extra_options = {}
if os.environ.get("TRACE_BATCHES"):
    from model.training import inputs  # noqa: E402
    from tests.trace_batches import traced  # noqa: E402

    extra_options["training_batches"] = traced(inputs.folder_batches, _append_to(os.environ["TRACE_BATCHES"]))

_train = loop.train
loop.train = lambda config, extra_callbacks=(), **kwargs: _train(config, (*extra_callbacks, SlowSteps()),
                                                                 **extra_options, **kwargs)

if __name__ == "__main__":
    launch(train)
