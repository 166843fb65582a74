"""train.py with a pause after every training step: a run slow enough to be killed mid-epoch.

    python tests/slow_train.py SECONDS_PER_STEP [train.py flags ...]

A test aid, kept out of the production code: it adds one callback through the library's
`extra_callbacks` and is otherwise exactly train.py's command.
"""

import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SECONDS_PER_STEP = float(sys.argv.pop(1))

import keras  # noqa: E402
from absl import app  # noqa: E402

import train  # noqa: E402  (defines the flags)
from model.training import loop  # noqa: E402


class SlowSteps(keras.callbacks.Callback):
    def on_train_batch_end(self, batch, logs=None):
        time.sleep(SECONDS_PER_STEP)


_train = loop.train
loop.train = lambda config, extra_callbacks=(), **kwargs: _train(config, (*extra_callbacks, SlowSteps()), **kwargs)

if __name__ == "__main__":
    app.run(train.main)
