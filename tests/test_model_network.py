"""The multi-image model: fusion under the mask, packed compute, saving, distribution, precision,
and the random mirror of training (ModelConfig.flip).

Everything runs the tiny backbone on 32 px images except the weight-loading test, which needs
the full Xception at its 71 px minimum. Models are cached per (fusion, packed) for the module.
"""

import contextlib
import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from model.network import backbone as backbone_lib
from model.network import fusion as fusion_lib
from model.network.multi_image import ModelConfig, build_model

pytestmark = pytest.mark.slow  # in-process, but ~90 s of model builds and train steps

SIZE = 32
FUSIONS = fusion_lib.FUSIONS
# 1, 2, 3 and 4 real images, and one product whose real images are not the first slots.
MASK = np.array(
    [[1, 0, 0, 0], [1, 1, 0, 0], [1, 1, 1, 0], [1, 1, 1, 1], [0, 1, 0, 1]], dtype=np.float32
)


def _config(**overrides) -> ModelConfig:
    fields = dict(num_classes=11, num_level1=3, num_level2=5, image_size=SIZE, backbone="tiny")
    return ModelConfig(**{**fields, **overrides})


def _images(mask, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (len(mask), mask.shape[1], SIZE, SIZE, 3), dtype=np.uint8)
    # Zeros where padded, as the input pipeline gives them.
    return images * mask[:, :, None, None, None].astype(np.uint8)


def _predict(model, images, mask, training=False):
    out = model({"images": images, "mask": mask}, training=training)
    return {k: v.numpy() for k, v in out.items()}


def _assert_same(a, b, atol=1e-5):
    assert a.keys() == b.keys()
    for key in a:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5, atol=atol, err_msg=key)


def _calibrate_batchnorm(model):
    """Sets every BatchNorm's moving statistics to those of one batch.

    At initialisation (moving mean 0, variance 1) the tiny network's activations shrink layer by
    layer to logits of ~1e-4, where any tolerance would pass; calibrated, they are O(1).
    """
    layers = model.get_layer("image_encoder").backbone.layers
    bns = [layer for layer in layers if isinstance(layer, keras.layers.BatchNormalization)]
    for bn in bns:
        bn.momentum = 0.0
    images = _images(MASK, seed=10)
    model({"images": images, "mask": MASK}, training=True)
    for bn in bns:
        bn.momentum = 0.99


@pytest.fixture(scope="module")
def models():
    """(fusion, packed) -> model; packed and padded models of one fusion share their weights."""
    keras.utils.set_random_seed(0)
    cache = {}
    for fusion in FUSIONS:
        packed = build_model(_config(fusion=fusion, packed=True))
        _calibrate_batchnorm(packed)
        padded = build_model(_config(fusion=fusion, packed=False))
        padded.set_weights(packed.get_weights())
        cache[fusion, True], cache[fusion, False] = packed, padded
    return cache


@pytest.fixture(scope="module")
def strategy():
    """One MirroredStrategy over the 2 logical CPUs for every test here: the collectives of a
    second strategy in the same process reuse the first one's instance keys, and fail on the
    first model whose gradients have another shape."""
    return tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])


@pytest.fixture
def restore_policy():
    policy = keras.mixed_precision.global_policy()
    yield
    keras.mixed_precision.set_global_policy(policy)


def test_config_rejects_unknown_fusion_and_names_the_allowed_ones():
    with pytest.raises(ValueError, match="mean, max, mean_max, gated, late"):
        ModelConfig(num_classes=3, fusion="median")
    with pytest.raises(ValueError, match="backbone"):
        ModelConfig(num_classes=3, backbone="resnet")
    with pytest.raises(ValueError, match="weights"):
        ModelConfig(num_classes=3, backbone="tiny", weights="imagenet")


def test_output_dict_shapes_and_dtypes(models):
    out = _predict(models["mean_max", True], _images(MASK), MASK)
    assert {k: v.shape for k, v in out.items()} == {
        "category": (5, 11), "level1": (5, 3), "level2": (5, 5)
    }
    assert all(v.dtype == np.float32 and np.isfinite(v).all() for v in out.values())
    only_category = build_model(_config(num_level1=0, num_level2=0))
    assert list(only_category.output.keys()) == ["category"]


def test_extra_feature_keys_are_ignored(models):
    model = models["mean", True]
    features = {"images": _images(MASK), "mask": MASK}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # Keras notes the unexpected key, then drops it
        with_id = model.predict({**features, "product_id": np.arange(5)}, batch_size=5, verbose=0)
    _assert_same(with_id, _predict(model, features["images"], MASK), atol=1e-4)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
@pytest.mark.parametrize("fusion", FUSIONS)
def test_padded_slots_and_image_order_do_not_matter(models, fusion, packed):
    model = models[fusion, packed]
    images = _images(MASK)
    reference = _predict(model, images, MASK)

    noise = np.random.default_rng(1).integers(0, 256, images.shape, dtype=np.uint8)
    padded_slots = (MASK == 0)[:, :, None, None, None]
    _assert_same(_predict(model, np.where(padded_slots, noise, images), MASK), reference)

    # Any permutation of a product's slots: reorders its real images and moves its padding.
    rng = np.random.default_rng(2)
    perm = np.stack([rng.permutation(4) for _ in MASK])
    rows = np.arange(len(MASK))[:, None]
    _assert_same(_predict(model, images[rows, perm], MASK[rows, perm]), reference)

    # ...while a real image does count (else the two checks above prove nothing).
    changed = images.copy()
    changed[2, 1] = noise[2, 1]
    out = _predict(model, changed, MASK)
    assert not np.allclose(out["category"][2], reference["category"][2], atol=1e-4)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_packed_equals_padded_in_inference(models, fusion):
    images = _images(MASK)
    _assert_same(
        _predict(models[fusion, True], images, MASK),
        _predict(models[fusion, False], images, MASK),
        atol=1e-4,
    )


def _seed_state(model):
    return model.get_layer("image_encoder").seed_generator.state


def _replay(model, state, images, mask):
    """A training-mode call that draws the mirrors `state` draws (the generator is set back)."""
    _seed_state(model).assign(state)
    return _predict(model, images, mask, training=True)


def test_training_mode_batchnorm_sees_padding_only_when_padded(models):
    # Packed: padded slots never reach the backbone, so even batch statistics ignore them.
    # Padded: they are in the BatchNorm batch, which is one more reason to pack. Both models
    # mirror in training; each pair of calls draws the same mirrors.
    images = _images(MASK)
    noisy = np.where((MASK == 0)[:, :, None, None, None], 255, images).astype(np.uint8)
    packed, padded = models["mean", True], models["mean", False]
    state = _seed_state(packed).numpy()
    _assert_same(_replay(packed, state, noisy, MASK), _replay(packed, state, images, MASK))
    state = _seed_state(padded).numpy()
    moved = _replay(padded, state, noisy, MASK)["category"]
    still = _replay(padded, state, images, MASK)["category"]
    assert not np.allclose(moved, still, atol=1e-4)


def test_fusion_functions_against_numpy():
    rng = np.random.default_rng(3)
    features = rng.normal(size=(5, 4, 6)).astype(np.float32)
    logits = rng.normal(size=(5, 4, 7)).astype(np.float32)
    scores = rng.normal(size=(5, 4)).astype(np.float32)
    for row, real in enumerate(MASK.astype(bool)):
        f = features[row, real]
        got = fusion_lib.masked_mean(features, MASK)[row]
        np.testing.assert_allclose(got, f.mean(0), rtol=1e-5, atol=1e-6)
        np.testing.assert_allclose(fusion_lib.masked_max(features, MASK)[row], f.max(0), rtol=1e-6)
        w = np.exp(scores[row, real]) / np.exp(scores[row, real]).sum()
        got = fusion_lib.attention_pool(features, scores, MASK)[row]
        np.testing.assert_allclose(got, (w[:, None] * f).sum(0), rtol=1e-5, atol=1e-6)
        probs = np.exp(logits[row, real]) / np.exp(logits[row, real]).sum(-1, keepdims=True)
        got = fusion_lib.late_log_probs(logits, MASK)[row]
        np.testing.assert_allclose(got, np.log(probs.mean(0)), rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("fusion", FUSIONS)
def test_one_model_reads_any_number_of_slots(models, fusion):
    """Data converted with another --max_images (issue 28): the network is shared over slots, so
    the products of MASK's first three rows give the same outputs in 2, 4 or 6 slots."""
    model = models[fusion, True]
    mask, images = MASK[:3], _images(MASK[:3])
    reference = _predict(model, images, mask)
    for slots in (3, 6):
        wider_mask = np.zeros([3, slots], np.float32)
        wider_mask[:, :3] = mask[:, :3]
        wider = np.zeros([3, slots, SIZE, SIZE, 3], np.uint8)
        wider[:, :3] = images[:, :3]
        _assert_same(_predict(model, wider, wider_mask), reference, atol=1e-4)
    assert model.inputs[0].shape[1] is None


@pytest.mark.parametrize(
    "fusion, packed", [("mean_max", True), ("gated", False), ("late", True)]
)
def test_keras_save_load_round_trip(models, fusion, packed, tmp_path):
    model = models[fusion, packed]
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    images = _images(MASK)
    _assert_same(_predict(loaded, images, MASK), _predict(model, images, MASK), atol=1e-6)
    assert loaded.get_layer("image_encoder").packed == packed


@pytest.mark.parametrize("momentum", [0.9, 0.5])
def test_bn_momentum_sets_how_far_a_training_step_moves_the_statistics(momentum, tmp_path):
    # Same initial weights, one training-mode call each: the moving mean starts at 0 and moves
    # by (1 - momentum) x the batch mean, so its ratio to the default (0.99) model's is fixed.
    moved = {}
    for m in (0.99, momentum):
        keras.utils.set_random_seed(3)
        model = build_model(_config(bn_momentum=m))
        model({"images": _images(MASK), "mask": MASK}, training=True)
        bn = model.get_layer("image_encoder").backbone.get_layer("block1_conv1_bn")
        moved[m] = bn.moving_mean.numpy()
    np.testing.assert_allclose(moved[momentum], moved[0.99] * (1 - momentum) / 0.01, rtol=1e-3, atol=1e-9)
    assert np.abs(moved[0.99]).max() > 1e-5  # the statistics did move

    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    bns = [l for l in loaded.get_layer("image_encoder").backbone.layers if isinstance(l, keras.layers.BatchNormalization)]
    assert bns and all(l.momentum == momentum for l in bns)
    with pytest.raises(ValueError, match="bn_momentum"):
        _config(bn_momentum=1.0)


def _batch(size=8, seed=4):
    counts = np.array([1, 2, 1, 4, 1, 3, 2, 1])[:size]
    mask = (np.arange(4)[None, :] < counts[:, None]).astype(np.float32)
    labels = np.random.default_rng(seed).integers(0, 11, size)
    return {"images": _images(mask, seed), "mask": mask}, labels


def _xent():
    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def test_mirrored_step_matches_single_device_with_per_replica_batchnorm(strategy):
    """One SGD step on 2 replicas == the same global batch on one device, BN per half.

    MirroredStrategy splits the global batch of 8 into two halves of 4; plain BatchNorm
    normalises each half with its own statistics. The single-device reference therefore runs
    the two halves separately (in training mode) and averages their losses and gradients,
    which is exactly what the replicas' all-reduce of the scaled losses computes. Packed mode:
    each replica gathers a different number of real images.
    """
    keras.utils.set_random_seed(5)
    # No mirror: the reference could not draw the replicas' mirrors (see the flip tests below).
    config = _config(fusion="gated", num_level1=0, num_level2=0, packed=True, flip=False)
    x, y = _batch()
    lr = 0.5
    with strategy.scope():
        mirrored = build_model(config)
        mirrored.compile(optimizer=keras.optimizers.SGD(lr), loss={"category": _xent()})
    reference = build_model(config)
    reference.set_weights(mirrored.get_weights())
    before = [v.numpy() for v in reference.trainable_variables]

    history = mirrored.fit(x, {"category": y}, batch_size=8, epochs=1, shuffle=False, verbose=0)

    losses, grads = [], []
    for half in (slice(0, 4), slice(4, 8)):
        with tf.GradientTape() as tape:
            logits = reference({k: v[half] for k, v in x.items()}, training=True)["category"]
            loss = _xent()(y[half], logits)
        losses.append(float(loss))
        grads.append(tape.gradient(loss, reference.trainable_variables))
    np.testing.assert_allclose(history.history["loss"][0], np.mean(losses), rtol=1e-5)
    # The halves' statistics are not the whole batch's: the reference above is not a tautology.
    whole = _xent()(y, reference(x, training=True)["category"])
    assert abs(float(whole) - np.mean(losses)) > 1e-3

    after = {v.path: v.numpy() for v in mirrored.trainable_variables}
    moved = 0
    for v, w0, g1, g2 in zip(reference.trainable_variables, before, *grads):
        expected = w0 - lr * (g1.numpy() + g2.numpy()) / 2
        np.testing.assert_allclose(after[v.path], expected, rtol=1e-4, atol=1e-5, err_msg=v.path)
        moved += not np.allclose(after[v.path], w0, rtol=1e-4, atol=1e-5)
    # Most variables moved beyond the tolerance, so the comparison above has teeth.
    assert moved > 0.8 * len(before), (moved, len(before))


def test_mixed_bfloat16_step_keeps_float32_logits(restore_policy):
    keras.mixed_precision.set_global_policy("mixed_bfloat16")
    model = build_model(_config(fusion="gated"))
    conv = model.get_layer("image_encoder").backbone.get_layer("block1_conv1")
    assert conv.compute_dtype == "bfloat16"
    losses = {name: _xent() for name in ("category", "level1", "level2")}
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=losses)
    x, y = _batch(4)
    loss = model.train_on_batch(x, {"category": y, "level1": y % 3, "level2": y % 5})
    assert np.isfinite(loss).all()
    assert all(v.dtype == tf.float32 for v in model(x).values())


def test_mixed_float16_logits_are_float32(restore_policy):
    keras.mixed_precision.set_global_policy("mixed_float16")
    model = build_model(_config(fusion="late"))
    conv = model.get_layer("image_encoder").backbone.get_layer("block1_conv1")
    assert conv.compute_dtype == "float16"
    x, _ = _batch(4)
    out = model(x)
    assert all(v.dtype == tf.float32 and np.isfinite(v.numpy()).all() for v in out.values())


def test_jit_compile_train_step_in_padded_mode():
    model = build_model(_config(packed=False, num_level1=0, num_level2=0))
    loss = {"category": _xent()}
    model.compile(optimizer=keras.optimizers.SGD(0.1), loss=loss, jit_compile=True)
    assert model.jit_compile is True
    x, y = _batch(2)
    assert np.isfinite(model.train_on_batch(x, {"category": y})).all()


def test_jit_compile_with_packed_falls_back_with_a_warning():
    model = build_model(_config(packed=True, num_level1=0, num_level2=0))
    with pytest.warns(UserWarning, match="jit_compile"):
        model.compile(optimizer="adam", loss={"category": _xent()}, jit_compile=True)
    assert model.jit_compile is False


# ---------------------------------------------------------------------------------------------
# The random mirror of training (issue 11: moved from the input pipeline into the model)
#
# Which images a training call mirrored is read off the encoder's per-slot features: with every
# BatchNorm frozen (trainable=False: inference statistics even in training mode) an image's
# features depend on that image alone, so in a training call each real slot's features equal
# those of either the image or its mirror, computed separately in inference.

PROBE_MASK = np.ones((32, 4), np.float32)  # 128 real images


def _probe(seed=0, packed=True, strategy=None, **overrides):
    """A model whose BatchNorms are calibrated (features O(1)), then frozen."""
    with strategy.scope() if strategy else contextlib.nullcontext():
        model = build_model(_config(seed=seed, packed=packed, **overrides))
    state = _seed_state(model).numpy() if model.get_layer("image_encoder").flip else None
    _calibrate_batchnorm(model)
    if state is not None:
        _seed_state(model).assign(state)  # calibration was a training call: start at the seed
    for layer in model.get_layer("image_encoder").backbone.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.trainable = False
    return model


def _mirrored(images):
    return images[:, :, :, ::-1]  # [B, M, H, W, 3]: W is axis 3


def _which_mirrored(encoder, images, mask, features):
    """bool [B, M]: the real slots whose training-mode `features` are those of the mirror.
    Fails unless every real slot matches exactly one of the two, clearly."""
    upright = encoder(images, mask, training=False).numpy()
    mirror = encoder(_mirrored(images), mask, training=False).numpy()
    features = np.asarray(features)
    to_upright = np.abs(features - upright).max(-1)
    to_mirror = np.abs(features - mirror).max(-1)
    gap = np.abs(upright - mirror).max(-1)
    real = mask > 0
    assert gap[real].min() > 1e-2, "an image and its mirror must give different features"
    assert (np.minimum(to_upright, to_mirror)[real] < 1e-4).all(), "each slot: the image or its mirror"
    return (to_mirror < to_upright) & real


def test_flip_mirrors_half_the_images_independently_per_image_and_per_step():
    model = _probe(seed=1)
    encoder = model.get_layer("image_encoder")
    images = _images(PROBE_MASK, seed=11)
    steps = np.stack([_which_mirrored(encoder, images, PROBE_MASK, encoder(images, PROBE_MASK, training=True))
                      for _ in range(4)])  # [4 steps, 32 products, 4 slots]
    assert 0.4 < steps.mean() < 0.6, steps.mean()  # 512 draws: 0.5 +- 0.022
    # Per image, not per product or per batch: a product's 4 slots agree 1 time in 8 on average.
    all_agree = (steps.all(-1) | ~steps.any(-1)).mean()
    assert all_agree < 0.3, all_agree
    assert 0.35 < (steps[..., 0] == steps[..., 1]).mean() < 0.65
    # Per step: an image's draw in one step says nothing about the next.
    assert 0.35 < (steps[1:] == steps[:-1]).mean() < 0.65
    # A training call through the whole model takes the same road (the model's features differ
    # from an inference call's only by those mirrors).
    out = model({"images": images, "mask": PROBE_MASK}, training=True)["category"].numpy()
    assert not np.allclose(out, _predict(model, images, PROBE_MASK)["category"], atol=1e-4)


def test_no_flip_in_inference_and_flip_false_never_mirrors():
    model, plain = _probe(seed=2), _probe(seed=2, flip=False)
    plain.set_weights(model.get_weights())
    images = _images(MASK, seed=12)
    state = _seed_state(model).numpy()
    # Inference (evaluate, predict, serving): the image as it is, and no draw at all.
    _assert_same(_predict(model, images, MASK), _predict(plain, images, MASK))
    predicted = model.predict({"images": images, "mask": MASK}, batch_size=5, verbose=0)
    _assert_same(predicted, _predict(plain, images, MASK), atol=1e-4)
    np.testing.assert_array_equal(_seed_state(model).numpy(), state)
    # flip=False: no mirror in training either (frozen BatchNorm: training == inference).
    _assert_same(_predict(plain, images, MASK, training=True), _predict(plain, images, MASK))
    assert plain.get_layer("image_encoder").seed_generator is None
    # ...while flip=True does mirror in training (else the checks above prove nothing).
    trained = _predict(model, images, MASK, training=True)
    assert not np.allclose(trained["category"], _predict(model, images, MASK)["category"], atol=1e-4)


@pytest.mark.parametrize("packed", [True, False], ids=["packed", "padded"])
def test_flip_leaves_padded_slots_out(packed):
    """Padded slots are never mirrored (nor moved into a real slot) and their content changes
    nothing in a training call. The whole model with live BatchNorms and noise in the padding:
    test_training_mode_batchnorm_sees_padding_only_when_padded."""
    model = _probe(seed=3, packed=packed)
    encoder = model.get_layer("image_encoder")
    mask = np.tile(MASK, (4, 1))  # 20 products, 1-4 real images, one with holes
    images = _images(mask, seed=13)
    noise = np.random.default_rng(14).integers(0, 256, images.shape, dtype=np.uint8)
    noisy = np.where((mask == 0)[:, :, None, None, None], noise, images)
    state = _seed_state(model).numpy()
    features = encoder(noisy, mask, training=True).numpy()
    assert not features[mask == 0].any(), "padded slots' features stay zero"
    # Every real slot holds its own image or its mirror, whatever the padding holds.
    flipped = _which_mirrored(encoder, images, mask, features)
    assert 0 < flipped.sum() < mask.sum()
    _seed_state(model).assign(state)  # the same draws without the noise: the same features
    np.testing.assert_allclose(encoder(images, mask, training=True).numpy(), features, atol=1e-5)
    drawn = encoder._draw_mirror(tf.reshape(mask > 0.5, [-1])).numpy().reshape(mask.shape)
    assert drawn.any() and not drawn[mask == 0].any(), "a padded slot is never drawn for a mirror"


def test_flip_is_reproducible_under_a_seed():
    def draws(seed):
        keras.utils.set_random_seed(0)  # the same weights for every model
        model = _probe(seed=seed)
        encoder = model.get_layer("image_encoder")
        images = _images(PROBE_MASK, seed=15)
        return np.stack([_which_mirrored(encoder, images, PROBE_MASK, encoder(images, PROBE_MASK, training=True))
                         for _ in range(3)])

    first, again, other = draws(4), draws(4), draws(5)
    np.testing.assert_array_equal(first, again)
    assert (first != other).mean() > 0.3


def test_flip_config_survives_a_keras_round_trip(tmp_path):
    assert ModelConfig(num_classes=3).flip is True and ModelConfig(num_classes=3).seed is None
    for flip, seed in [(False, None), (True, 7)]:
        model = build_model(_config(flip=flip, seed=seed))
        path = tmp_path / f"model_{flip}.keras"
        model.save(path)
        encoder = keras.saving.load_model(path).get_layer("image_encoder")
        assert (encoder.flip, encoder.seed) == (flip, seed)
        assert (encoder.seed_generator is not None) == flip


def test_flip_under_mirrored_strategy_differs_between_replicas(strategy):
    """The replicas share the generator's state (one step, one state), so each folds its index
    into the seed: else both would mirror the same slots of their halves of the batch."""
    model = _probe(seed=6, strategy=strategy)
    encoder = model.get_layer("image_encoder")
    half = _images(PROBE_MASK, seed=16)
    both = tf.data.Dataset.from_tensors((np.concatenate([half, half]), np.concatenate([PROBE_MASK] * 2)))
    images, mask = next(iter(strategy.experimental_distribute_dataset(both)))

    @tf.function
    def step(images, mask):
        return strategy.run(lambda i, m: encoder(i, m, training=True), args=(images, mask))

    start = _seed_state(model).numpy()
    steps = []
    for _ in range(2):
        per_replica = strategy.experimental_local_results(step(images, mask))
        steps.append([_which_mirrored(encoder, half, PROBE_MASK, f) for f in per_replica])
    np.testing.assert_array_equal(_seed_state(model).numpy(), start + [0, 2])  # once per step
    for replicas in steps:
        assert all(0.3 < r.mean() < 0.7 for r in replicas)
        assert 0.3 < (replicas[0] == replicas[1]).mean() < 0.7  # independent, not the same slots
    assert (steps[0][0] != steps[1][0]).any()


@pytest.mark.parametrize("distributed", [False, True], ids=["one_device", "mirrored"])
def test_flip_inside_fit_draws_every_step_reproducibly(strategy, distributed):
    """model.fit's compiled step draws new mirrors every step (the generator advances once a
    step, on one device and with 2 replicas); on one device the same seed (and weights) gives the
    same training, another seed other mirrors, so other weights."""
    x, y = _batch()

    def train(seed):
        with strategy.scope() if distributed else contextlib.nullcontext():
            keras.utils.set_random_seed(8)  # the same initial weights every time
            model = build_model(_config(fusion="mean", num_level1=0, num_level2=0, seed=seed))
            model.compile(optimizer=keras.optimizers.SGD(0.5), loss={"category": _xent()})
        start = _seed_state(model).numpy()
        model.fit(x, {"category": y}, batch_size=4, epochs=2, shuffle=False, verbose=0)
        steps = 2 * 2  # 2 epochs of 2 batches of 4 (with 2 replicas, 2 products each)
        np.testing.assert_array_equal(_seed_state(model).numpy(), start + [0, steps])
        return [v.numpy() for v in model.trainable_variables]

    first = train(9)
    if distributed:
        return
    again, other = train(9), train(10)
    for a, b in zip(first, again):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    assert max(np.abs(a - b).max() for a, b in zip(first, other)) > 1e-3


def _save_legacy_h5(model, path):
    # The layout of the published xception_weights_tf_dim_ordering_tf_kernels_notop.h5.
    import h5py
    from keras.src.legacy.saving import legacy_h5_format

    with h5py.File(path, "w") as f:
        legacy_h5_format.save_weights_to_hdf5_group(f, model)


@pytest.fixture(scope="module")
def xception_files(tmp_path_factory):
    """A random keras.applications.Xception saved as .weights.h5 and as a legacy notop .h5."""
    keras.utils.set_random_seed(6)
    reference = keras.applications.Xception(
        include_top=False, weights=None, input_shape=(71, 71, 3), pooling="avg"
    )
    # Move the BatchNorm statistics off their 0/1 initial values so that they are checked too.
    rng = np.random.default_rng(6)
    for layer in reference.layers:
        if isinstance(layer, keras.layers.BatchNormalization):
            layer.moving_mean.assign(rng.normal(0, 0.1, layer.moving_mean.shape))
            layer.moving_variance.assign(rng.uniform(0.5, 1.5, layer.moving_variance.shape))
    folder = tmp_path_factory.mktemp("xception")
    files = {
        ".weights.h5": str(folder / "xception.weights.h5"),
        "_notop.h5": str(folder / "xception_notop.h5"),
    }
    reference.save_weights(files[".weights.h5"])
    _save_legacy_h5(reference, files["_notop.h5"])
    return reference, files


@pytest.mark.parametrize("suffix", [".weights.h5", "_notop.h5"])
def test_xception_weights_from_local_file(xception_files, suffix):
    reference, files = xception_files
    config = ModelConfig(num_classes=3, image_size=71, backbone="xception", weights=files[suffix])
    ours = build_model(config).get_layer("image_encoder").backbone
    pixels = np.random.default_rng(7).uniform(-1, 1, (2, 71, 71, 3)).astype(np.float32)
    np.testing.assert_allclose(ours(pixels), reference(pixels), rtol=1e-4, atol=1e-5)


def test_pretrained_weights_need_the_full_architecture(xception_files, tmp_path):
    tiny = backbone_lib.xception(71, backbone_lib.TINY)
    with pytest.raises(FileNotFoundError):
        backbone_lib.load_weights(tiny, str(tmp_path / "missing.h5"))
    with pytest.raises(ValueError, match="full 'xception'"):
        backbone_lib.load_weights(tiny, xception_files[1][".weights.h5"])
