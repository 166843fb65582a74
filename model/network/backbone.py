"""Xception (Chollet, CVPR 2017) as one parameterised function, and its weight loading.

`xception(...)` with the defaults builds the same graph as `keras.applications.Xception(
include_top=False, pooling="avg")`: same layer classes in the same order, the same names for
every layer Keras names (the two residual 1x1 convs of each downsampling block are unnamed
there and named `blockN_residual_*` here), so ImageNet weights copy over one to one. The tiny
configuration is the same code with 1/8 of the filters and one middle block: it trains at
hundreds of images/s on 2 CPU cores, where the full network manages ~8.
"""

from __future__ import annotations

import dataclasses
import os

import keras
from keras import layers


@dataclasses.dataclass(frozen=True)
class XceptionSpec:
    """The knobs of the architecture; the defaults are the paper's network."""

    width: float = 1.0  # multiplies every filter count
    entry_blocks: int = 3  # downsampling blocks of the entry flow: 128, 256, 728 filters
    middle_blocks: int = 8


FULL = XceptionSpec()
# Width 1/8 keeps every block (separable convs, residuals, BN) but cuts the pointwise convs,
# which dominate the cost, ~64x; one middle block instead of 8 cuts the rest.
TINY = XceptionSpec(width=0.125, entry_blocks=3, middle_blocks=1)
SPECS = {"xception": FULL, "tiny": TINY}

_STEM = (32, 64)
_ENTRY = (128, 256, 728)
_EXIT = (1024, 1536, 2048)


def _filters(n: int, width: float) -> int:
    # Multiples of 8 keep the vector units busy; every full-width count is one, so width=1 is exact.
    return max(8, int(round(n * width / 8)) * 8)


def xception(image_size: int, spec: XceptionSpec = FULL, name: str = "xception") -> keras.Model:
    """Float images in [-1, 1], [N, S, S, 3] -> globally average-pooled features [N, D].

    D is 2048 at full width. Layer order and names follow keras.applications.Xception so that
    `load_weights` can copy its weights (see below).
    """
    if spec.entry_blocks < 1 or spec.middle_blocks < 0:
        raise ValueError(f"need >= 1 entry block and >= 0 middle blocks, got {spec}")
    f = lambda n: _filters(n, spec.width)  # noqa: E731
    inputs = keras.Input(shape=(image_size, image_size, 3), name=f"{name}_input")

    x = layers.Conv2D(f(_STEM[0]), 3, strides=2, use_bias=False, name="block1_conv1")(inputs)
    x = layers.BatchNormalization(name="block1_conv1_bn")(x)
    x = layers.Activation("relu", name="block1_conv1_act")(x)
    x = layers.Conv2D(f(_STEM[1]), 3, use_bias=False, name="block1_conv2")(x)
    x = layers.BatchNormalization(name="block1_conv2_bn")(x)
    x = layers.Activation("relu", name="block1_conv2_act")(x)

    block = 2
    for i, filters in enumerate(_ENTRY[: spec.entry_blocks]):
        # Block 2 takes the stem's output already activated; Keras names its first act sepconv2.
        x = _downsampling_block(x, block, f(filters), f(filters), pre_activation=i > 0)
        block += 1

    middle = f(_ENTRY[spec.entry_blocks - 1])
    for _ in range(spec.middle_blocks):
        residual = x
        for conv in (1, 2, 3):
            x = layers.Activation("relu", name=f"block{block}_sepconv{conv}_act")(x)
            x = _sepconv_bn(x, middle, f"block{block}_sepconv{conv}")
        x = layers.add([x, residual])
        block += 1

    x = _downsampling_block(x, block, middle, f(_EXIT[0]), pre_activation=True)
    block += 1
    for conv, filters in ((1, _EXIT[1]), (2, _EXIT[2])):
        x = _sepconv_bn(x, f(filters), f"block{block}_sepconv{conv}")
        x = layers.Activation("relu", name=f"block{block}_sepconv{conv}_act")(x)
    x = layers.GlobalAveragePooling2D(name="avg_pool")(x)
    return keras.Model(inputs, x, name=name)


def _sepconv_bn(x, filters: int, name: str):
    x = layers.SeparableConv2D(filters, 3, padding="same", use_bias=False, name=name)(x)
    return layers.BatchNormalization(name=f"{name}_bn")(x)


def _downsampling_block(x, block: int, filters1: int, filters2: int, pre_activation: bool):
    """Two separable convs and a stride-2 max pool, plus a strided 1x1 conv shortcut."""
    prefix = f"block{block}"
    residual = layers.Conv2D(
        filters2, 1, strides=2, padding="same", use_bias=False, name=f"{prefix}_residual_conv"
    )(x)
    residual = layers.BatchNormalization(name=f"{prefix}_residual_bn")(residual)
    if pre_activation:
        x = layers.Activation("relu", name=f"{prefix}_sepconv1_act")(x)
    x = _sepconv_bn(x, filters1, f"{prefix}_sepconv1")
    x = layers.Activation("relu", name=f"{prefix}_sepconv2_act")(x)
    x = _sepconv_bn(x, filters2, f"{prefix}_sepconv2")
    x = layers.MaxPooling2D(3, strides=2, padding="same", name=f"{prefix}_pool")(x)
    return layers.add([x, residual])


def load_weights(backbone: keras.Model, weights: str) -> None:
    """Copies pretrained Xception weights into a full-width `xception(...)` backbone.

    `weights` is "imagenet" (downloaded by Keras) or a local file that
    `keras.applications.Xception(include_top=False, weights=PATH)` accepts: the published
    `xception_weights_tf_dim_ordering_tf_kernels_notop.h5`, a legacy `.h5` or a Keras 3
    `.weights.h5`. Letting Keras read the file into its own Xception and copying layer by layer
    means every format Keras knows works here, and any architecture mismatch fails loudly.
    """
    if weights != "imagenet" and not os.path.exists(weights):
        raise FileNotFoundError(f"Xception weights file not found: {weights}")
    # Weights do not depend on the image size; 71 is Keras's minimum and the cheapest to build.
    reference = keras.applications.Xception(
        include_top=False, weights=weights, input_shape=(71, 71, 3)
    )
    ours = [layer for layer in backbone.layers if layer.weights]
    theirs = [layer for layer in reference.layers if layer.weights]
    if len(ours) != len(theirs):
        raise ValueError(
            f"backbone {backbone.name!r} has {len(ours)} layers with weights, Xception has "
            f"{len(theirs)}: pretrained weights need the full 'xception' configuration"
        )
    for mine, ref in zip(ours, theirs):
        shapes = [tuple(w.shape) for w in mine.weights]
        ref_shapes = [tuple(w.shape) for w in ref.weights]
        # Keras leaves the residual convs unnamed (conv2d_N, batch_normalization_N).
        unnamed = ref.name.startswith(("conv2d", "batch_normalization"))
        same_name = unnamed or mine.name == ref.name
        if shapes != ref_shapes or type(mine) is not type(ref) or not same_name:
            raise ValueError(
                f"cannot copy Xception layer {ref.name} {ref_shapes} into {mine.name} {shapes}"
            )
        mine.set_weights(ref.get_weights())
