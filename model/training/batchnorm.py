"""BatchNorm statistics re-estimated after training ("precise BN")."""

from __future__ import annotations

import keras


def recalibrate_batchnorm(model: keras.Model, dataset, steps: int) -> int:
    """Replaces every BatchNorm layer's moving mean/variance by the average of its batch
    statistics over `steps` training batches, with the weights frozen ("precise BN").

    Why: the moving averages (momentum 0.99) trail the weights by ~100 steps; in a short run at a
    high learning rate they describe a network that no longer exists, and inference accuracy can
    sit near chance while training accuracy is high. Runs eagerly so the momentum can change per
    batch (1 - 1/i makes the moving value the plain mean of the i batches seen).
    """
    layers = [l for l in _all_layers(model) if isinstance(l, keras.layers.BatchNormalization)]
    if not layers or steps <= 0:
        return 0
    saved = [l.momentum for l in layers]
    seen = 0
    try:
        for i, (inputs, _) in enumerate(dataset.take(steps), start=1):
            for layer in layers:
                layer.momentum = 1.0 - 1.0 / i
            # training=True: batch statistics, and the moving ones updated; no gradients taken.
            model({"images": inputs["images"], "mask": inputs["mask"]}, training=True)
            seen = i
    finally:
        for layer, momentum in zip(layers, saved):
            layer.momentum = momentum
    return seen


def _all_layers(model):
    for layer in model._flatten_layers(include_self=False, recursive=True):
        yield layer
