"""Losses, metrics, the optimizer and its learning-rate schedule: how train.py's flags become a
compiled Keras model. `cfg` is a training.TrainConfig."""

from __future__ import annotations

import keras

OPTIMIZERS = ("adamw", "sgd")


def learning_rate_schedule(cfg, steps_per_epoch: int):
    """Linear warmup to base_lr * batch/256, then cosine decay over the remaining steps."""
    peak = cfg.base_lr * cfg.batch_size / 256.0
    total = max(1, cfg.epochs * steps_per_epoch)
    warmup = min(int(cfg.warmup_epochs * steps_per_epoch), total - 1)
    return keras.optimizers.schedules.CosineDecay(
        initial_learning_rate=0.0 if warmup else peak,
        decay_steps=max(1, total - warmup),
        alpha=cfg.min_lr_ratio,
        warmup_target=peak if warmup else None,
        warmup_steps=warmup,
    )


def make_optimizer(cfg, schedule) -> keras.optimizers.Optimizer:
    if cfg.optimizer == "adamw":
        optimizer = keras.optimizers.AdamW(learning_rate=schedule, weight_decay=cfg.weight_decay)
    elif cfg.optimizer == "sgd":
        # Keras 3 applies weight_decay decoupled (like AdamW) for every optimizer.
        optimizer = keras.optimizers.SGD(
            learning_rate=schedule, momentum=cfg.momentum, nesterov=True,
            weight_decay=cfg.weight_decay or None,
        )
    else:
        raise ValueError(f"unknown optimizer {cfg.optimizer!r}: use one of {OPTIMIZERS}")
    # Decaying BatchNorm scales/offsets and biases only fights the normalisation.
    optimizer.exclude_from_weight_decay(var_names=["bias", "gamma", "beta"])
    return optimizer


def compile_model(model: keras.Model, cfg, optimizer, aux_heads: dict) -> None:
    ce = lambda: keras.losses.CategoricalCrossentropy(  # noqa: E731
        from_logits=True, label_smoothing=cfg.label_smoothing
    )
    # Keras prefixes a metric with its output's name only when the model has several outputs: the
    # callbacks and the final report read category_top1 either way.
    prefix = "" if aux_heads else "category_"
    losses = {"category": ce()}
    weights = {"category": 1.0}
    for name in aux_heads:
        losses[name] = ce()
        weights[name] = cfg.aux_loss_weight
    model.compile(
        optimizer=optimizer,
        loss=losses,
        loss_weights=weights,
        metrics={
            "category": [
                keras.metrics.CategoricalAccuracy(name=prefix + "top1"),
                keras.metrics.TopKCategoricalAccuracy(k=5, name=prefix + "top5"),
            ]
        },
        jit_compile=cfg.jit_compile,
        steps_per_execution=cfg.steps_per_execution,
    )
