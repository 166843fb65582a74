"""SIGINT and SIGTERM stop at safe points (model/signals.py), never inside TensorFlow or Keras."""

import os
import signal
import subprocess
import sys

import keras
import numpy as np
import pytest

from model import errors, signals
from tests.record_helpers import REPO


class SignalsItself(keras.layers.Layer):
    """A layer whose call delivers SIGTERM to this process: Python runs the handler in the
    middle of Keras' call machinery, where the earlier handler raised."""

    armed = False  # not while Keras builds the model, outside the handlers' block

    def call(self, x):
        if self.armed:
            os.kill(os.getpid(), signal.SIGTERM)
        return x + 1.0


def test_a_signal_inside_keras_waits_for_the_next_safe_point():
    layer = SignalsItself()
    model = keras.Sequential([keras.Input((2,)), layer])
    with signals.stop_requests() as requests:
        layer.armed = True
        out = model(np.zeros((1, 2), np.float32))  # no exception from inside Keras
        assert requests.signum == signal.SIGTERM
        np.testing.assert_array_equal(np.asarray(out), [[1.0, 1.0]])
        with pytest.raises(errors.Interrupted) as stop:
            signals.raise_if_requested()
    assert stop.value.signum == signal.SIGTERM and str(stop.value) == "stopped by SIGTERM"


def test_outside_the_block_nothing_is_requested_and_the_handlers_come_back():
    before = {s: signal.getsignal(s) for s in signals.SIGNALS}
    with signals.stop_requests():
        assert all(signal.getsignal(s) != before[s] for s in signals.SIGNALS)
    assert {s: signal.getsignal(s) for s in signals.SIGNALS} == before
    signals.raise_if_requested()  # no active block: a no-op


def test_a_second_signal_stops_the_process_at_once():
    code = ("import os, signal, time; from model import signals\n"
            "with signals.stop_requests() as r:\n"
            "    os.kill(os.getpid(), signal.SIGINT); time.sleep(0.2); print('first recorded', r.signum, flush=True)\n"
            "    os.kill(os.getpid(), signal.SIGINT); time.sleep(2); print('survived the second', flush=True)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=REPO, capture_output=True, text=True, timeout=60)
    assert run.stdout.splitlines() == [f"first recorded {int(signal.SIGINT)}"], run.stderr
    assert run.returncode == -signal.SIGINT
