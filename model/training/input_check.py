"""Does the input keep up? Two rates measured before training, on this host and these devices:

  * what the model consumes: products/s of the model's own train step (`train_step`, under the
    strategy) on one cached batch, no input at all, run a few times and then undone (weights,
    optimizer state, BatchNorm statistics and random states restored): the run is unchanged;
  * what the input delivers: products/s of the training stream read on its own.

The start line gives both and the verdict. During training, the step scalars' `step_input_wait`
(callbacks.StepScalars) is derived from the first rate: the share of a log window's training
time not explained by compute at that rate (docs/FORMATS.md, logs/).
"""

from __future__ import annotations

import dataclasses
import math
import time

import keras
import tensorflow as tf

MODEL_STEPS = 5  # timed train steps on the cached batch, after one untimed (tracing) step
INPUT_SECONDS = 2.0  # the input is read for this long at most (after its first batch) ...
INPUT_BATCHES = 20  # ... or this many batches


@dataclasses.dataclass(frozen=True)
class Rates:
    model: float  # products/s the model consumes, input excluded
    input: float | None  # products/s the input delivers (None: not measured, e.g. a shared data service)

    @property
    def step_seconds(self) -> float:
        """Seconds of compute per product at the model's rate (the unit of input_wait)."""
        return 1.0 / self.model

    def verdict(self, devices: str) -> str:
        head = (f"Input check ({devices}): the model consumes {self.model:,.0f} products/s (one cached batch)")
        if self.input is None:
            return head + "; the input is read from the tf.data service: watch step_input_wait in TensorBoard"
        head += f", the input delivers {self.input:,.0f} products/s"
        if self.input >= self.model:
            return head + ": the input keeps up"
        wait = 1.0 - self.input / self.model
        more = math.ceil(self.model / self.input) - 1
        return (head + f": the input falls short, the devices would wait ~{wait:.0%} of the time. Add tf.data "
                f"service workers (README section 6): about {more} with this host's input rate, or decode "
                "smaller (--image_size)")


def measure(model: keras.Model, strategy: tf.distribute.Strategy, train_ds, global_batch: int,
            measure_input: bool = True) -> Rates:
    with strategy.scope():
        if not model.optimizer.built:
            model.optimizer.build(model.trainable_variables)
    batch = next(iter(train_ds))  # one distributed batch, kept: the model's rate without input
    model_rate = _model_rate(model, strategy, batch, global_batch)
    return Rates(model_rate, _input_rate(train_ds, global_batch) if measure_input else None)


def _model_rate(model, strategy, batch, global_batch: int) -> float:
    saved = [variable.numpy() for variable in _state(model)]

    def step(data):
        return strategy.run(model.train_step, args=(data,))

    step = tf.function(step, jit_compile=model.jit_compile is True)
    try:
        step(batch)  # traced and compiled: not timed
        start = time.perf_counter()
        for _ in range(MODEL_STEPS):
            step(batch)
        keras.ops.convert_to_numpy(model.optimizer.iterations)  # the steps have finished
        seconds = time.perf_counter() - start
    finally:
        with strategy.scope():
            for variable, value in zip(_state(model), saved):
                variable.assign(value)
        model.reset_metrics()
    return MODEL_STEPS * global_batch / max(seconds, 1e-9)


def _state(model) -> list:
    """Every variable a train step changes: weights, BatchNorm statistics, seed states, the
    optimizer's slots and its step count."""
    return list(model.variables) + list(model.optimizer.variables)


def _input_rate(train_ds, global_batch: int) -> float:
    iterator = iter(train_ds)
    next(iterator)  # buffers fill: not the steady rate
    start, batches = time.perf_counter(), 0
    while batches < INPUT_BATCHES and time.perf_counter() - start < INPUT_SECONDS:
        next(iterator)
        batches += 1
    return batches * global_batch / max(time.perf_counter() - start, 1e-9)
