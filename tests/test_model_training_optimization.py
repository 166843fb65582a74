"""model/training/optimization.py: the learning-rate schedule at given steps, the optimizer a flag
chooses and the variables its weight decay leaves alone, and what compile_model wires (losses,
their weights, label smoothing, the metric names the callbacks and train_state.json read)."""

import math

import keras
import numpy as np
import pytest

from model.config import TrainConfig
from model.network.multi_image import ModelConfig, build_model
from model.training import callbacks, optimization


def config(**overrides) -> TrainConfig:
    return TrainConfig(data_dir="unused", model_dir="unused", **overrides)


# ---------------------------------------------------------------------------------------------
# The schedule: linear warmup from 0 to base_lr * batch / 256, then cosine down to min_lr_ratio of it.

# base_lr 1e-3 at batch 512: a peak of 2e-3. 2 epochs of 10 steps; warmup 0.4 epoch = 4 steps, then
# 16 steps of cosine (half way at step 12).
PEAK = 2e-3
SCHEDULE = dict(base_lr=1e-3, batch_size=512, epochs=2, warmup_epochs=0.4, min_lr_ratio=0.1)


@pytest.mark.parametrize("step, expected", [
    (0, 0.0),
    (1, PEAK / 4),
    (2, PEAK / 2),
    (3, 3 * PEAK / 4),
    (4, PEAK),  # warmup done: the top of the cosine
    (8, PEAK * (0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi / 4)))),
    (12, PEAK * (0.1 + 0.9 * 0.5)),  # half way down
    (20, PEAK * 0.1),  # the last step: base * min_lr_ratio
    (1000, PEAK * 0.1),  # past the end it stays there
])
def test_warmup_then_cosine(step, expected):
    schedule = optimization.learning_rate_schedule(config(**SCHEDULE), steps_per_epoch=10)
    assert float(schedule(step)) == pytest.approx(expected, rel=1e-5, abs=1e-12)


@pytest.mark.parametrize("overrides, steps_per_epoch, values", [
    # No warmup: the peak from step 0, cosine to 0 over the 10 steps.
    (dict(base_lr=0.1, batch_size=256, epochs=1, warmup_epochs=0.0), 10,
     {0: 0.1, 5: 0.05, 10: 0.0}),
    # The peak scales with the global batch: 1e-3 at 256 is 4e-3 at 1024.
    (dict(base_lr=1e-3, batch_size=1024, epochs=1, warmup_epochs=0.0), 4, {0: 4e-3, 2: 2e-3}),
    # A warmup longer than the run is cut to the run less one step, so the peak is reached.
    (dict(base_lr=0.1, batch_size=256, epochs=1, warmup_epochs=3.0), 4, {0: 0.0, 1: 0.1 / 3, 3: 0.1, 4: 0.0}),
    # A fractional warmup rounds down to whole steps: 0.25 x 10 = 2.
    (dict(base_lr=0.1, batch_size=256, epochs=1, warmup_epochs=0.25), 10, {1: 0.05, 2: 0.1}),
])
def test_schedule_edges(overrides, steps_per_epoch, values):
    schedule = optimization.learning_rate_schedule(config(**overrides), steps_per_epoch)
    assert {step: float(schedule(step)) for step in values} == pytest.approx(values, rel=1e-5, abs=1e-9)


# ---------------------------------------------------------------------------------------------
# The optimizer


@pytest.mark.parametrize("name, weight_decay, kind, expected", [
    ("adamw", 0.05, keras.optimizers.AdamW, dict(weight_decay=0.05)),
    ("sgd", 5e-4, keras.optimizers.SGD, dict(weight_decay=5e-4, momentum=0.8, nesterov=True)),
    ("sgd", 0.0, keras.optimizers.SGD, dict(weight_decay=None, momentum=0.8, nesterov=True)),
])
def test_make_optimizer_choices(name, weight_decay, kind, expected):
    cfg = config(optimizer=name, weight_decay=weight_decay, momentum=0.8)
    schedule = optimization.learning_rate_schedule(cfg, steps_per_epoch=10)
    optimizer = optimization.make_optimizer(cfg, schedule)
    assert type(optimizer) is kind
    assert {key: getattr(optimizer, key) for key in expected} == pytest.approx(expected)
    assert optimizer._learning_rate is schedule  # the schedule itself, read at every step


def test_unknown_optimizer_names_the_choices():
    with pytest.raises(ValueError) as error:
        optimization.make_optimizer(config(optimizer="adam"), 0.1)
    assert str(error.value) == "unknown optimizer 'adam': use one of ('adamw', 'sgd')"


def decay_model() -> keras.Model:
    """Kernels of three kinds, biases, and a BatchNorm's gamma and beta."""
    inputs = keras.Input((6, 6, 2))
    x = keras.layers.SeparableConv2D(3, 3, name="separable")(inputs)
    x = keras.layers.BatchNormalization(name="bn")(x)
    x = keras.layers.Flatten()(x)
    return keras.Model(inputs, keras.layers.Dense(2, name="head")(x))


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_weight_decay_shrinks_kernels_only(name):
    """A step with zero gradients moves a variable by its weight decay alone: lr * wd of it."""
    lr, wd = 0.1, 0.5
    model = decay_model()
    for variable in model.trainable_variables:  # nonzero everywhere, so decay would show
        variable.assign(np.full(variable.shape, 2.0, np.float32))
    optimizer = optimization.make_optimizer(config(optimizer=name, weight_decay=wd), lr)
    optimizer.apply_gradients([(keras.ops.zeros(v.shape), v) for v in model.trainable_variables])
    after = {v.path: float(np.asarray(v).flat[0]) for v in model.trainable_variables}
    decayed = 2.0 * (1 - lr * wd)
    assert after == pytest.approx({
        "separable/depthwise_kernel": decayed, "separable/pointwise_kernel": decayed, "separable/bias": 2.0,
        "bn/gamma": 2.0, "bn/beta": 2.0, "head/kernel": decayed, "head/bias": 2.0,
    })


def test_weight_decay_on_the_real_network_spares_exactly_biases_and_batchnorm():
    """The exclusion is a regex over the TensorFlow variable's name, which is the whole path
    ("layer/kernel"): a layer whose name held "bias", "beta" or "gamma" would lose the decay of its
    kernels. The network's layers (tiny backbone: the Xception code at 1/8 width, every head)
    must not: every kernel decays, no bias, gamma or beta does."""
    model = build_model(ModelConfig(num_classes=5, num_level1=2, num_level2=3, image_size=32, backbone="tiny",
                                    fusion="gated"))
    before = {v.path: np.array(v) for v in model.trainable_variables}
    optimizer = optimization.make_optimizer(config(weight_decay=0.5), 0.1)
    optimizer.apply_gradients([(keras.ops.zeros(v.shape), v) for v in model.trainable_variables])
    after = {v.path: np.array(v) for v in model.trainable_variables}
    spared = {path for path in before if np.array_equal(after[path], before[path])}
    kind = {path: path.rsplit("/", 1)[1] for path in before}
    assert {kind[path] for path in spared} == {"bias", "gamma", "beta"}
    assert {path for path in before if kind[path] in ("bias", "gamma", "beta")} == spared
    for path in set(before) - spared:  # every other variable: a kernel, shrunk by lr * wd exactly
        assert kind[path] in ("kernel", "depthwise_kernel", "pointwise_kernel"), path
        np.testing.assert_allclose(after[path], before[path] * (1 - 0.1 * 0.5), rtol=1e-6, err_msg=path)


# ---------------------------------------------------------------------------------------------
# compile_model

NUM_CLASSES = 7
LOGITS = np.arange(NUM_CLASSES, 0, -1, dtype=np.float32)  # class 0 ranks first, class 6 last


def constant_model(aux_heads: dict) -> keras.Model:
    """Outputs fixed logits whatever the input: LOGITS for the category, zeros for the aux heads."""
    inputs = keras.Input((3,), name="x")
    outputs = {"category": keras.layers.Dense(NUM_CLASSES, kernel_initializer="zeros",
                                              bias_initializer=keras.initializers.Constant(LOGITS),
                                              name="category")(inputs)}
    for head, classes in aux_heads.items():
        outputs[head] = keras.layers.Dense(classes, kernel_initializer="zeros", name=head)(inputs)
    return keras.Model(inputs, outputs)


def one_hot(labels, classes):
    return np.eye(classes, dtype=np.float32)[labels]


def evaluated_names(aux_heads: dict) -> list[str]:
    model = constant_model(aux_heads)
    cfg = config()
    optimization.compile_model(model, cfg, optimization.make_optimizer(cfg, 0.01), aux_heads)
    model.run_eagerly = True  # one small batch: faster than a trace
    labels = np.array([0, 1, 2, 3])
    y = {"category": one_hot(labels, NUM_CLASSES), **{h: one_hot(labels % n, n) for h, n in aux_heads.items()}}
    return sorted(model.evaluate(np.ones((4, 3), np.float32), y, batch_size=4, return_dict=True, verbose=0))


def test_compile_model_metric_names():
    """The names the callbacks (callbacks.TOP1), best.keras's monitor and train_state.json read
    (one aux head: test_compile_model_losses_weights_smoothing_and_topk)."""
    names = evaluated_names({"level1": 3, "level2": 5})
    assert names == ["category_loss", "category_top1", "category_top5", "level1_loss", "level2_loss", "loss"]
    assert callbacks.TOP1 in names


def test_the_top1_the_callbacks_read_exists_without_aux_heads():
    # It did not (Keras names a single output's metrics top1): the final report raised KeyError.
    assert callbacks.TOP1 in evaluated_names({})


@pytest.mark.parametrize("smoothing", [0.0, 0.3])
def test_compile_model_losses_weights_smoothing_and_topk(smoothing):
    aux = {"level1": 3}
    cfg = config(label_smoothing=smoothing, aux_loss_weight=0.25, steps_per_execution=3)
    model = constant_model(aux)
    optimization.compile_model(model, cfg, optimization.make_optimizer(cfg, 0.01), aux)
    assert model.steps_per_execution == 3 and model.jit_compile is False
    model.run_eagerly = True  # one small batch: faster than a trace
    labels = np.array([0, 3, 6, 5])  # ranks 1, 4, 7 and 6 of the logits
    y = {"category": one_hot(labels, NUM_CLASSES), "level1": one_hot(labels % 3, 3)}
    result = model.evaluate(np.ones((4, 3), np.float32), y, batch_size=4, return_dict=True, verbose=0)

    log_p = LOGITS - np.log(np.exp(LOGITS).sum())
    target = (1 - smoothing) * y["category"] + smoothing / NUM_CLASSES
    category_loss = float(-(target * log_p).sum(axis=1).mean())
    level1_loss = math.log(3)  # uniform logits: smoothing changes nothing
    assert result["category_loss"] == pytest.approx(category_loss, rel=1e-5)
    assert result["level1_loss"] == pytest.approx(level1_loss, rel=1e-5)
    assert result["loss"] == pytest.approx(category_loss + 0.25 * level1_loss, rel=1e-5)
    assert result["category_top1"] == 0.25 and result["category_top5"] == 0.5
    assert sorted(result) == ["category_loss", "category_top1", "category_top5", "level1_loss", "loss"]
