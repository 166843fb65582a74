"""The model's random-number states (Keras SeedGenerators: the training mirror, dropout) in the
backup, so that a resumed run draws the numbers an uninterrupted one would.

Keras saves a layer's own variables only: a SeedGenerator's state is left out of
`save_weights` and of `.keras` files, and a rebuilt model starts its draws from the seed again.
The states go to a file named by the optimizer step they belong to, written before the backup's
weights: whatever weights a kill leaves, the states of their step are on disk.
"""

from __future__ import annotations

import json
import os

import keras
import tensorflow as tf

from model import atomic

_PREFIX = "random_states-"


def _state_variables(model: keras.Model) -> list:
    # model.variables lists them in a fixed order (layer by layer), unlike their paths, whose
    # names take a suffix when a process builds a second model.
    return [v for v in model.variables if v.path.endswith("seed_generator_state")]


def _path(backup_dir: str, step: int) -> str:
    return os.path.join(backup_dir, f"{_PREFIX}{step}.json")


def save(backup_dir: str, model: keras.Model, step: int) -> None:
    states = [keras.ops.convert_to_numpy(v).tolist() for v in _state_variables(model)]
    atomic.write_text(_path(backup_dir, step), json.dumps(states))


def drop_older(backup_dir: str, step: int) -> None:
    """Removes the states of steps before `step` (once the weights of `step` are written)."""
    for path in tf.io.gfile.glob(os.path.join(backup_dir, f"{_PREFIX}*.json")):
        name = os.path.basename(path)[len(_PREFIX):-len(".json")]
        if name.isdigit() and int(name) < step:
            tf.io.gfile.remove(path)


def restore(backup_dir: str, model: keras.Model, step: int) -> bool:
    """Sets the model's random states to those saved at `step`; False when there are none."""
    path = _path(backup_dir, step)
    variables = _state_variables(model)
    if not variables:
        return True
    if not tf.io.gfile.exists(path):
        return False
    with tf.io.gfile.GFile(path) as f:
        states = json.load(f)
    if len(states) != len(variables):
        return False
    for variable, state in zip(variables, states):
        variable.assign(keras.ops.convert_to_tensor(state, dtype=variable.dtype))
    return True
