"""The run's settings, each declared once: a field's default, its help and its bounds (and
choices) live with the field, and train.py's and evaluate.py's flags are made from them
(cli.define_flags). TrainConfig is saved in model_dir as train_config.json["train"] and read
back by evaluation and by a resumed run; EvalConfig is what evaluate.py runs with.

Imports no TensorFlow: the command line and evaluation read it as plain data.
"""

from __future__ import annotations

import dataclasses

import record_schema

PRECISIONS = ("float32", "mixed_bfloat16", "mixed_float16")
# The choices of settings whose code lives above this module (the flags need them before any
# TensorFlow loads); tests/test_model_config.py checks they are the lists those modules implement.
BACKBONES = ("xception", "tiny")  # network/backbone.SPECS
FUSIONS = ("mean", "max", "mean_max", "gated", "late")  # network/fusion.FUSIONS
OPTIMIZERS = ("adamw", "sgd")  # training/optimization.OPTIMIZERS
ENSEMBLE_MEANS = ("arithmetic", "geometric")
DUP_LOOKUP_LEVELS = ("image", "product")  # the first is the default (BUILD_NOTES.md measures both)
SPLITS = ("train", "val", "test")
VERIFY_RECORDS_HELP = ("Read every record of every shard before starting (O(bytes)); the default checks the "
                       "shards' names and sizes against metadata.json (--skip_corrupt_records reads every "
                       "record too).")


def setting(default=dataclasses.MISSING, help: str = "", *, lower_bound=None, upper_bound=None,  # noqa: A002
            choices: tuple[str, ...] | None = None, flag_none=None):
    """A config field with what its flag says: help, bounds, enum choices. flag_none: the value
    the flag writes for the field's None (--crop_size=0: no crop)."""
    metadata = {"help": help, "lower_bound": lower_bound, "upper_bound": upper_bound, "choices": choices,
                "flag_none": flag_none}
    return dataclasses.field(default=default, metadata=metadata)


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

    @classmethod
    def from_train_json(cls, values: dict) -> "ImageSpec":
        """From a saved train_config.json["train"] (crop_size 0 in files written before None)."""
        return cls.from_flags(int(values.get("image_size", record_schema.IMAGE_SIZE)), values.get("crop_size"))


@dataclasses.dataclass
class TrainConfig:
    """What train.py runs with (model/training/loop.py: `train(cfg)`), one field a flag."""

    data_dir: str = setting(help="Output folder of `python -m beam_convert` (metadata.json, shards).")
    model_dir: str = setting(help="Where checkpoints, logs, model.keras and export/ go.")
    # Model.
    backbone: str = setting("xception", "Per-image network.", choices=BACKBONES)
    fusion: str = setting("mean_max", "How a product's images are combined.", choices=FUSIONS)
    packed: bool = setting(True, "Run the backbone on real images only (skip padded slots).")
    image_size: int = setting(record_schema.IMAGE_SIZE, "Decoded image side (JPEGs are 180).", lower_bound=16)
    crop_size: int | None = setting(None, "Random crop side for training, 0 for none.", lower_bound=0, flag_none=0)
    flip: bool = setting(True, "Mirror each training image left-right at random (in the model, on the "
                         "accelerator); --noflip for pictures whose text must read the right way.")
    weights: str = setting("", '"" (random init), "imagenet" or a .weights.h5 file.')
    init_from: str = setting("", "Start from a trained model: a model_dir (its model.keras) or a .keras file "
                             "(e.g. MODEL_DIR/best.keras). Any other flag may differ (image size, crop, schedule, "
                             "data); a head whose classes differ is re-initialised, and said. Ignored when resuming "
                             "from this model_dir's backup.")
    dropout: float = setting(0.0, "Dropout before the classifier.", lower_bound=0, upper_bound=0.9)
    bn_momentum: float = setting(0.99, "BatchNorm moving-average momentum: the statistics trail the weights by "
                                 "~1/(1 - momentum) steps, so short runs want ~0.9.", lower_bound=0, upper_bound=0.999)
    # Schedule.
    epochs: int = setting(10, "Training epochs.", lower_bound=1)
    batch_size: int = setting(256, "Global batch (products), split across replicas.", lower_bound=1)
    steps_per_epoch: int = setting(0, "0: train products // batch_size.", lower_bound=0)
    validation_steps: int = setting(0, "0: the whole val split.", lower_bound=0)
    optimizer: str = setting("adamw", "adamw, or sgd with Nesterov momentum.", choices=OPTIMIZERS)
    base_lr: float = setting(1e-3, "Peak learning rate per 256 products of global batch.", lower_bound=0)
    warmup_epochs: float = setting(1.0, "Linear warmup length before the cosine decay.", lower_bound=0)
    min_lr_ratio: float = setting(0.0, "Final learning rate as a fraction of the peak.", lower_bound=0)
    weight_decay: float = setting(0.05, "Decoupled weight decay (not on biases/BN).", lower_bound=0)
    momentum: float = setting(0.9, "SGD momentum.", lower_bound=0, upper_bound=1)
    label_smoothing: float = setting(0.1, "Label smoothing of every head.", lower_bound=0, upper_bound=1)
    aux_loss_weight: float = setting(0.2, "Weight of the level1/level2 heads (0: none).", lower_bound=0)
    # Execution.
    precision: str = setting("float32", "Keras dtype policy.", choices=PRECISIONS)
    jit_compile: bool = setting(False, "XLA-compile the train step.")
    steps_per_execution: int = setting(1, "Train steps per tf.function call.", lower_bound=1)
    cpu_devices: int = setting(0, "Split the CPU into N logical devices (MirroredStrategy on a machine without "
                               "GPUs); 0 or 1: one device.", lower_bound=0)
    shuffle_buffer: int = setting(2048, "Products in the shuffle buffer.", lower_bound=1)
    seed: int = setting(0, "Seed of everything random: initial weights, file order, shuffle, crops, mirrors. 0: one "
                        "is drawn at first start and recorded in train_config.json, so a resumed run reads exactly "
                        "the batches it would have read uninterrupted.", lower_bound=0)
    deterministic: bool = setting(False, "Deterministic ops too (tf.config.experimental.enable_op_determinism): two "
                                  "runs of one seed, or a run killed and resumed, end with bit-identical weights. "
                                  "Slower; README: Interrupted?")
    skip_corrupt_records: bool = setting(False, "Read past damaged shards: the rest of each damaged file is "
                                         "skipped, named once and counted in train_state.json (one read of the "
                                         "shards first); without it a damaged shard stops training with one line "
                                         "naming it.")
    verify_records: bool = setting(False, VERIFY_RECORDS_HELP)
    data_service: str = setting("", "grpc://HOST:PORT of a tf.data service dispatcher (python -m "
                                "model.data_service dispatcher): the training stream (read, decode, crop, batch) "
                                "runs on its workers, which must see --data_dir at the same path; validation stays "
                                "here. Empty: all input on this host.")
    # Checkpoints and logs.
    bn_recalibration_steps: int = setting(20, "After training, re-estimate BatchNorm statistics on this many "
                                          "training batches (0: keep the moving averages).", lower_bound=0)
    backup_every_steps: int = setting(100, "Back up the training state every N steps.", lower_bound=1)
    log_every_steps: int = setting(100, "TensorBoard scalars every N optimizer steps (loss, top-1, learning rate, "
                                   "products/s) besides the per-epoch ones; 0: per epoch only.", lower_bound=0)
    profile_batches: str = setting("", 'Profile optimizer steps "START,STOP" (1-based, whatever '
                                   '--steps_per_execution) into logs/train: TensorBoard\'s Profile tab.')
    expect_gpus: bool = setting(False, "A GPU configuration: warn at start when TensorFlow sees no GPU.")
    sample_products: int = setting(8, "Products in the TensorBoard sample grid.", lower_bound=0)
    input_check: bool = setting(True, "At start, measure what the model consumes (one cached batch) and what the "
                                "input delivers, and say whether the input keeps up; also gives step_input_wait.")
    export_top_k: int = setting(5, "Categories returned by the SavedModel.", lower_bound=1)
    export_flip_tta: bool = setting(False, "The SavedModels average each product's predictions with those of its "
                                    "mirror image, as evaluate.py --flip_tta does (twice the serving compute).")
    verbose: int = setting(2, "Keras fit verbosity: 1 progress bar, 2 one line an epoch.")

    def __post_init__(self):
        # The one conversion of "no crop" to None: the flag's 0, and the 0 of a train_config.json
        # written before None was its spelling, both arrive here.
        if self.crop_size == 0:
            self.crop_size = None

    @property
    def image(self) -> ImageSpec:
        """The image side of this run: its .side is what the network sees."""
        return ImageSpec(self.image_size, self.crop_size)


def config_from_json(values: dict) -> TrainConfig:
    """The TrainConfig saved in train_config.json["train"]; keys no longer known are ignored."""
    known = {field.name for field in dataclasses.fields(TrainConfig)}
    return TrainConfig(**{name: value for name, value in values.items() if name in known})


@dataclasses.dataclass
class EvalConfig:
    """What evaluate.py runs with (model/evaluation/evaluate.py: `evaluate(cfg)`)."""

    data_dir: str = setting(help="beam_convert output folder holding the split.")
    model_dir: str = setting(help="train.py's model_dir (model.keras, labels.csv, train_config.json); several, "
                             "comma-separated, evaluate their ensemble.")
    checkpoint: str = setting("final", "final (model.keras) or best (best.keras: the epoch with the best val "
                              "top-1); one for every model or one per model, comma-separated.")
    ensemble_weights: str | None = setting(None, "One weight per model, comma-separated (default: equal).")
    ensemble_mean: str = setting(ENSEMBLE_MEANS[0], "How an ensemble combines its models' class probabilities.",
                                 choices=ENSEMBLE_MEANS)
    save_top_k: int = setting(0, "Also write top_k.npz: each product's K best classes and probabilities (0: not "
                              "written).", lower_bound=0)
    split: str = setting("val", "Split to evaluate.", choices=SPLITS)
    output_dir: str | None = setting(None, "Default: MODEL_DIR/eval_SPLIT/ (eval_SPLIT_best/ with "
                                     "--checkpoint=best; the first model's eval_SPLIT_ensemble/ for an ensemble).")
    batch_size: int = setting(64, "Products per prediction batch.", lower_bound=1)
    flip_tta: bool = setting(False, "Average predictions with the left-right mirrored images.")
    dup_lookup: bool = setting(False, "Where an image is in the training set, predict with that image's training "
                               "categories (train_image_digests.npz of the training data folder).")
    dup_lookup_level: str = setting(DUP_LOOKUP_LEVELS[0], "image: a matched picture counts as its training "
                                    "labels, fused with the model's prediction from the product's other pictures; "
                                    "product: the matched categories replace the product's ranking.",
                                    choices=DUP_LOOKUP_LEVELS)
    train_data_dir: str | None = setting(None, "Training data folder (digests, class frequencies); default: the "
                                         "one the model was trained on.")
    skip_corrupt_records: bool = setting(False, "Read past damaged shards: the rest of each damaged file is "
                                         "skipped, named once and counted in metrics.json (skipped_records); "
                                         "without it a damaged shard stops evaluation with one line naming it.")
    verify_records: bool = setting(False, VERIFY_RECORDS_HELP)
