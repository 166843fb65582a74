"""The multi-image classifier: one shared Xception over a product's images, fused under the mask.

Inputs (docs/FORMATS.md section 3): {"images": uint8 [B, M, S, S, 3], "mask": float32 [B, M]}, any
number of slots M (the network is shared over slots under the mask, so data converted with another
--max_images is read by the same model); other keys of the features dict are ignored. Outputs: {"category": [B, K]} plus "level1"/"level2"
when configured, float32 logits under any mixed-precision policy.
"""

from __future__ import annotations

import dataclasses
from typing import Optional

import keras
import tensorflow as tf

import record_schema

from model.network import backbone as backbone_lib
from model.network.fusion import FUSIONS, GatedPooling, LateFusion, MaskedPooling


@dataclasses.dataclass
class ModelConfig:
    num_classes: int
    num_level1: int = 0  # auxiliary heads: 0 = absent
    num_level2: int = 0
    image_size: int = record_schema.IMAGE_SIZE
    backbone: str = "xception"  # or "tiny": the same code at 1/8 width, one middle block
    fusion: str = "mean_max"  # one of fusion.FUSIONS
    packed: bool = True  # run the backbone on real images only
    weights: Optional[str] = None  # None, "imagenet" or a path to Xception notop weights
    dropout: float = 0.0
    # The training data's image slots (metadata.json), recorded; the model takes any number.
    max_images: int = record_schema.MAX_IMAGES
    # The BatchNorm moving averages trail the weights by ~1 / (1 - momentum) steps: Keras' 0.99
    # suits long runs; a run of a few hundred steps validates near chance with it, hence 0.9 in
    # the CPU configuration.
    bn_momentum: float = 0.99
    # Random horizontal mirror of every real image in training (never in inference or serving),
    # drawn per image and per step on the model's first step (see ImageEncoder). Off for
    # catalogues whose pictures carry text that must read the right way.
    flip: bool = True
    # Seed of the mirror's draws: the same seed (and data) gives the same mirrors step after step.
    # None takes one from Python's `random` (so `keras.utils.set_random_seed` fixes it too).
    seed: Optional[int] = None

    def __post_init__(self):
        if self.fusion not in FUSIONS:
            allowed = ", ".join(FUSIONS)
            raise ValueError(f"unknown fusion {self.fusion!r}; allowed: {allowed}")
        if self.backbone not in backbone_lib.SPECS:
            allowed = ", ".join(backbone_lib.SPECS)
            raise ValueError(f"unknown backbone {self.backbone!r}; allowed: {allowed}")
        if self.weights is not None and self.backbone != "xception":
            raise ValueError("pretrained weights exist only for backbone='xception'")
        if self.num_classes < 1 or self.num_level1 < 0 or self.num_level2 < 0:
            raise ValueError("num_classes must be >= 1 and num_level1/num_level2 >= 0")
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout must be in [0, 1), got {self.dropout}")
        if not 0.0 <= self.bn_momentum < 1.0:
            raise ValueError(f"bn_momentum must be in [0, 1), got {self.bn_momentum}")
        if self.max_images < 1 or self.image_size < 32:
            raise ValueError("max_images must be >= 1 and image_size >= 32")

    def heads(self) -> dict:
        sizes = {"category": self.num_classes, "level1": self.num_level1, "level2": self.num_level2}
        return {name: size for name, size in sizes.items() if size}


@keras.saving.register_keras_serializable(package="cdiscount")
class ImageEncoder(keras.layers.Layer):
    """uint8 images [B, M, S, S, 3] and their mask [B, M] -> features [B, M, D], 0 where padded.

    flip=True: in training (training=True) every real image is mirrored left-right with
    probability 1/2, drawn independently per image and per call, before the uint8 -> float
    scaling: the input pipeline leaves the mirror to the model, where an accelerator does it almost
    for free and on the image at the backbone's size. Inference (training=False: evaluation,
    serving) never mirrors. The draws come from a `keras.random.SeedGenerator` (`seed`), which
    advances once per training call, also inside a compiled `fit` step; under a tf.distribute
    strategy all replicas hold the same generator state, so the replica's index is folded into the
    seed, else every replica would mirror the same slots of its share of the batch. Padded slots
    are never mirrored (packed: they are not in the backbone's batch at all).

    packed=True gathers the real images of the whole batch into one [N_real, S, S, 3] batch,
    runs the backbone on it and scatters the features back: at Cdiscount's 1.7 images a product
    that is ~2.3x fewer backbone passes than the 4 slots. It also keeps padded slots out of the
    BatchNorm batch statistics in training, which packed=False (all B*M slots through the
    backbone, features zeroed afterwards) cannot do.

    The packed batch's size depends on the data, and XLA compiles for static shapes, so a packed
    encoder reports `supports_jit = False`: Keras then resolves jit_compile="auto" to False and
    turns an explicit jit_compile=True into False with a warning. Use packed=False for XLA.
    """

    def __init__(
        self, backbone: str = "xception", image_size: int = record_schema.IMAGE_SIZE, packed: bool = True,
        bn_momentum: float = 0.99, flip: bool = True, seed: Optional[int] = None, **kwargs
    ):
        super().__init__(**kwargs)
        self.backbone_name = backbone
        self.image_size = image_size
        self.packed = packed
        self.flip = flip
        self.seed = seed
        # Created only when used: a layer's SeedGenerator state is a variable of the model.
        self.seed_generator = keras.random.SeedGenerator(seed) if flip else None
        spec = backbone_lib.SPECS[backbone]
        self.backbone = backbone_lib.xception(image_size, spec, name=backbone)
        self.bn_momentum = bn_momentum
        for layer in self.backbone.layers:
            if isinstance(layer, keras.layers.BatchNormalization):
                layer.momentum = bn_momentum
        self.features_dim = self.backbone.output_shape[-1]
        self.supports_jit = not packed

    def build(self, images_shape, image_mask_shape=None):
        pass  # the backbone was built in __init__, with a fixed image size

    def call(self, images, image_mask, training=None):
        batch, slots = tf.shape(images)[0], tf.shape(images)[1]
        flat = tf.reshape(images, [-1, self.image_size, self.image_size, 3])
        real = tf.reshape(image_mask > 0.5, [-1])
        mirror = self._draw_mirror(real) if self.flip and training else None
        if self.packed:
            index = tf.where(real)  # [N_real, 1] into the B*M slots
            real_images = tf.gather_nd(flat, index)
            if mirror is not None:
                real_images = _mirror(real_images, tf.gather_nd(mirror, index))
            features = self._backbone(real_images, training)
            shape = tf.stack([tf.cast(batch * slots, tf.int64), self.features_dim])
            features = tf.scatter_nd(index, features, shape)  # zeros in the padded slots
        else:
            if mirror is not None:
                flat = _mirror(flat, mirror)
            features = self._backbone(flat, training)
            features = tf.where(real[:, None], features, tf.zeros_like(features))
        return tf.reshape(features, [batch, slots, self.features_dim])

    def _draw_mirror(self, real):
        """bool [B*M]: which slots to mirror in this call, each real one with probability 1/2.

        One draw per slot (not per real image), so an image's draw depends on its slot and the
        step only, not on how many real images come before it, and the shape is static for XLA.
        """
        seed = self.seed_generator.next()  # advances the state: new draws every step
        # tf.random's stateless ops want an int32 seed pair (the same cast Keras' own ops do).
        seed = tf.cast(tf.math.floormod(seed, tf.int32.max - 1), tf.int32)
        replica = tf.distribute.get_replica_context()
        if replica is not None:  # None only in a strategy's cross-replica context
            seed = tf.random.experimental.stateless_fold_in(seed, replica.replica_id_in_sync_group)
        draws = tf.random.stateless_uniform(tf.shape(real), seed=seed)
        return tf.logical_and(draws < 0.5, real)

    def _backbone(self, images, training):
        """The backbone's features of uint8 images [N, S, S, 3], for any N, 0 included.

        A batch with no image happens in inference: a replica's share of a short last batch, a
        request whose every mask is 0. The backbone never sees one: oneDNN's Conv2D (TensorFlow's
        CPU default on AVX-512 CPUs) allocates an empty batch's output with the input's shape
        (tensorflow/core/kernels/mkl/mkl_conv_ops.cc) and the next BatchNorm fails, and cuDNN
        refuses empty batches (tensorflow/tensorflow#14657). So in inference one image of zeros
        rides along and its features are dropped. Training batches always hold images (every
        record has one, and batches are whole), and an extra image there would enter BatchNorm's
        batch statistics.
        """
        if training:
            return self.backbone(self._scale(images), training=True)
        count = tf.shape(images)[0]
        ballast = tf.zeros(tf.concat([[1], tf.shape(images)[1:]], 0), images.dtype)
        features = self.backbone(self._scale(tf.concat([images, ballast], 0)), training=False)
        return features[:count]

    def _scale(self, images):
        # Xception's preprocessing, [0, 255] -> [-1, 1], done here so the model takes raw uint8
        # (4x less to move through tf.data) and on the gathered batch only.
        return tf.cast(tf.cast(images, tf.float32) / 127.5 - 1.0, self.compute_dtype)

    def compute_output_shape(self, images_shape, image_mask_shape=None):
        return (images_shape[0], images_shape[1], self.features_dim)

    def get_config(self):
        own = {"backbone": self.backbone_name, "image_size": self.image_size, "packed": self.packed,
               "bn_momentum": self.bn_momentum, "flip": self.flip, "seed": self.seed}
        return {**super().get_config(), **own}


def _mirror(images, mirror):
    """uint8 [N, S, S, 3] -> each image mirrored left-right where `mirror` (bool [N]) is set.

    A blend of the image and its reversed view, x + (reversed - x) * m with m in {0, 1}: uint8
    arithmetic wraps modulo 256, so it gives exactly the reversed image where m is 1 and the image
    where it is 0. Static shapes (XLA), no per-image branch, and on a CPU 2.5x cheaper than the
    equivalent `tf.where` (TensorFlow's broadcasting select on uint8: ~45 us a 48 px image, this
    ~18; under XLA both ~4)."""
    m = tf.cast(mirror, images.dtype)[:, None, None, None]
    return images + (tf.reverse(images, [2]) - images) * m


def build_model(config: ModelConfig) -> keras.Model:
    """The functional model {"images", "mask"} -> {"category", ["level1"], ["level2"]} logits."""
    size = config.image_size
    # Any number of slots: the encoder and every fusion work per slot under the mask.
    images = keras.Input((None, size, size, 3), dtype="uint8", name="images")
    mask = keras.Input((None,), dtype="float32", name="mask")
    encoder = ImageEncoder(config.backbone, size, config.packed, config.bn_momentum, flip=config.flip,
                           seed=config.seed, name="image_encoder")
    if config.weights is not None:
        backbone_lib.load_weights(encoder.backbone, config.weights)
    features = encoder(images, mask)

    # Heads are float32 layers so the logits (and the losses on them) stay float32 under mixed
    # precision; they are a sliver of the compute.
    outputs = {}
    if config.fusion == "late":
        # The baseline: classify each image alone, average the probabilities of the real ones.
        features = keras.layers.Dropout(config.dropout, name="dropout")(features)
        for name, classes in config.heads().items():
            per_image = keras.layers.Dense(classes, dtype="float32", name=f"{name}_per_image")
            logits = per_image(features)
            outputs[name] = LateFusion(name=name)(logits, mask)
    else:
        if config.fusion == "gated":
            pooled = GatedPooling(name="fusion")(features, mask)
        else:
            pooled = MaskedPooling(config.fusion, name="fusion")(features, mask)
        pooled = keras.layers.Dropout(config.dropout, name="dropout")(pooled)
        for name, classes in config.heads().items():
            outputs[name] = keras.layers.Dense(classes, dtype="float32", name=name)(pooled)
    inputs = {"images": images, "mask": mask}
    return keras.Model(inputs, outputs, name=f"{config.backbone}_{config.fusion}")
