"""--init_from: a new run starts from a trained model's weights, at any image size, crop,
schedule or data (fine-tuning, progressive resizing, "more epochs" of a finished run).

Weights move layer by layer, by name: the backbone's convolutions do not depend on the image
size, so they always fit. A head moves only when the source was trained on the same class list
(its labels.csv, beside the model file): the same shapes with other classes would silently mean
other categories. Whatever stays initialised is said.
"""

from __future__ import annotations

import os

import keras
import numpy as np
import tensorflow as tf

from model.errors import UserError
from model.input_pipeline.labels import Labels, read_labels
from model.model_dir import RunFolder
from model.network import keras_file

HEADS = ("category", "level1", "level2", "category_per_image", "level1_per_image", "level2_per_image")


def source_file(init_from: str) -> str:
    """The .keras file --init_from names: itself, or a model_dir's final model."""
    path = init_from if init_from.endswith(".keras") else RunFolder(init_from).model_file
    if not tf.io.gfile.exists(path):
        hint = "" if init_from.endswith(".keras") else " (a model_dir whose training finished)"
        raise UserError(f"--init_from={init_from}: no {path}{hint}")
    return path


def same_classes(path: str, labels: Labels) -> bool:
    """Whether the model at `path` was trained on `labels`' classes, in the same order (the
    labels.csv train.py writes beside it); False when there is none to tell."""
    folder = os.path.dirname(path)
    if not tf.io.gfile.exists(RunFolder(folder).labels_file):
        return False
    return np.array_equal(read_labels(folder).category_ids, labels.category_ids)


def initialise(model: keras.Model, init_from: str, labels: Labels, log=print) -> dict:
    """Copies the weights of the model --init_from names into `model`; returns
    {"copied": [layer names], "initialised": [layer names]}."""
    path = source_file(init_from)
    source = keras_file.load(path)
    by_name = {layer.name: layer for layer in source.layers}
    heads_fit = same_classes(path, labels)
    copied, initialised = [], []
    for layer in model.layers:
        if not layer.weights:
            continue
        origin = by_name.get(layer.name)
        fits = origin is not None and [w.shape for w in origin.weights] == [w.shape for w in layer.weights]
        if layer.name == "image_encoder" and not fits:
            raise UserError(f"--init_from={init_from}: its image encoder does not fit this one (another "
                            "--backbone?); only the image size, crop and heads may differ")
        if fits and (layer.name not in HEADS or heads_fit):
            layer.set_weights(origin.get_weights())
            copied.append(layer.name)
        else:
            initialised.append(layer.name)
    log(f"Initialised from {path}: copied {', '.join(copied) or 'nothing'}")
    if initialised:
        why = "" if heads_fit else " (its class list differs from this data's labels.csv, or it has none beside it)"
        log(f"Left freshly initialised: {', '.join(initialised)}{why}")
    return {"copied": copied, "initialised": initialised}
