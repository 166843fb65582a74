"""The run's settings: one dataclass that train.py fills from flags, saved in model_dir as
train_config.json["train"], and read back by evaluation and by a resumed run.

Imports no TensorFlow: the command line and evaluation read it as plain data.
"""

from __future__ import annotations

import dataclasses

import record_schema

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")


@dataclasses.dataclass(frozen=True)
class ImageSpec:
    """How a product's pictures reach the network: decoded at `size`, then (crop) a crop x crop
    window of that picture, random in training and central elsewhere. `crop` None is no crop, the
    one spelling below the command line (whose flag writes it 0)."""

    size: int = record_schema.IMAGE_SIZE
    crop: int | None = None

    def __post_init__(self):
        if self.crop is not None and not 0 < self.crop <= self.size:
            raise ValueError(f"crop must be in 1..size ({self.size}), got {self.crop}")

    @property
    def side(self) -> int:
        """The side of the pictures the network sees."""
        return self.crop or self.size

    @classmethod
    def from_flags(cls, image_size: int, crop_size: int | None) -> "ImageSpec":
        """From the flags' spelling (--crop_size=0: none)."""
        return cls(image_size, crop_size or None)


@dataclasses.dataclass
class TrainConfig:
    data_dir: str
    model_dir: str
    # Model.
    backbone: str = "xception"
    fusion: str = "mean_max"
    packed: bool = True
    image_size: int = record_schema.IMAGE_SIZE
    crop_size: int = 0  # 0: no random crop
    flip: bool = True  # random left-right mirror of each image in training, inside the model
    weights: str = ""  # "" or "imagenet" (for the xception backbone) or a .weights.h5 path
    init_from: str = ""  # a model_dir (its model.keras) or a .keras file: start from its weights
    dropout: float = 0.0
    bn_momentum: float = 0.99  # BatchNorm moving averages; lower for short runs
    # Schedule.
    epochs: int = 10
    batch_size: int = 256  # global: split across replicas
    steps_per_epoch: int = 0  # 0: train products // batch_size
    validation_steps: int = 0  # 0: the whole val split
    optimizer: str = "adamw"
    base_lr: float = 1e-3  # learning rate for a global batch of 256, scaled linearly
    warmup_epochs: float = 1.0
    min_lr_ratio: float = 0.0  # cosine decays to base * this
    weight_decay: float = 0.05
    momentum: float = 0.9  # sgd only
    label_smoothing: float = 0.1
    aux_loss_weight: float = 0.2  # level1/level2 heads when labels.csv has the tree; 0 disables
    # Execution.
    precision: str = "float32"
    jit_compile: bool = False
    steps_per_execution: int = 1
    cpu_devices: int = 0  # >1: split the CPU into that many logical devices (MirroredStrategy)
    shuffle_buffer: int = 2048
    seed: int = 0  # 0: drawn at first start and recorded in train_config.json
    deterministic: bool = False  # bit-identical weights for a seed, resumed or not (slower)
    skip_corrupt_records: bool = False  # read past damaged shards (the rest of each file), counted
    data_service: str = ""  # grpc://HOST:PORT: the training stream runs on tf.data service workers
    # Checkpoints and logs.
    bn_recalibration_steps: int = 20  # batches to re-estimate BatchNorm statistics after training
    backup_every_steps: int = 100
    log_every_steps: int = 100  # step-level scalars in TensorBoard; 0: epoch-level only
    profile_batches: str = ""  # "10,20": profile those optimizer steps into logs/train
    expect_gpus: bool = False  # a GPU configuration: warn when none is visible
    sample_products: int = 8  # products shown in the TensorBoard image grid at start
    input_check: bool = True  # at start: the model's and the input's products/s, and the verdict
    export_top_k: int = 5
    export_flip_tta: bool = False  # the SavedModels average each product and its mirror image
    verbose: int = 2

    @property
    def image(self) -> ImageSpec:
        return ImageSpec.from_flags(self.image_size, self.crop_size)

    @property
    def model_image_size(self) -> int:
        return self.image.side


def config_from_json(values: dict) -> TrainConfig:
    """The TrainConfig saved in train_config.json["train"]; keys no longer known are ignored."""
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{name: value for name, value in values.items() if name in known})
