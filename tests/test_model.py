"""The multi-image model: fusion under the mask, packed compute, saving, distribution, precision.

Everything runs the tiny backbone on 32 px images except the weight-loading test, which needs
the full Xception at its 71 px minimum. Models are cached per (fusion, packed) for the module.
"""

import warnings

import keras
import numpy as np
import pytest
import tensorflow as tf

from model import backbone as backbone_lib
from model import fusion as fusion_lib
from model.multi_image import ModelConfig, build_model

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


def test_training_mode_batchnorm_sees_padding_only_when_padded(models):
    # Packed: padded slots never reach the backbone, so even batch statistics ignore them.
    # Padded: they are in the BatchNorm batch, which is one more reason to pack.
    images = _images(MASK)
    noisy = np.where((MASK == 0)[:, :, None, None, None], 255, images).astype(np.uint8)
    packed, padded = models["mean", True], models["mean", False]
    _assert_same(
        _predict(packed, noisy, MASK, training=True), _predict(packed, images, MASK, training=True)
    )
    moved = _predict(padded, noisy, MASK, training=True)["category"]
    still = _predict(padded, images, MASK, training=True)["category"]
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


def test_mirrored_step_matches_single_device_with_per_replica_batchnorm():
    """One SGD step on 2 replicas == the same global batch on one device, BN per half.

    MirroredStrategy splits the global batch of 8 into two halves of 4; plain BatchNorm
    normalises each half with its own statistics. The single-device reference therefore runs
    the two halves separately (in training mode) and averages their losses and gradients,
    which is exactly what the replicas' all-reduce of the scaled losses computes. Packed mode:
    each replica gathers a different number of real images.
    """
    keras.utils.set_random_seed(5)
    config = _config(fusion="gated", num_level1=0, num_level2=0, packed=True)
    x, y = _batch()
    lr = 0.5
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
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
