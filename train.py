"""Train the multi-image product classifier (docs/FORMATS.md section 4).

    python train.py --flagfile=configs/cpu_tiny.flags --data_dir=DIR --model_dir=DIR [--flag=value ...]

Flags after --flagfile override it. Bad flags fail here, at parse time, before any data is read.
Re-running the same command after an interruption resumes from model_dir/backup/.
"""

import dataclasses
import sys

from absl import app, flags

from model import cli, errors  # neither loads TensorFlow

cli.configure_environment()  # before TensorFlow loads: it reads these at import

from model import config  # noqa: E402
from model.network import backbone, fusion  # noqa: E402
from model.training import distribution, loop, optimization  # noqa: E402

FLAGS = flags.FLAGS
D = config.TrainConfig  # defaults live in one place: the dataclass

flags.DEFINE_string("data_dir", None, "Output folder of `python -m beam_convert` (metadata.json, shards).")
flags.DEFINE_string("model_dir", None, "Where checkpoints, logs, model.keras and export/ go.")

flags.DEFINE_enum("backbone", D.backbone, list(backbone.SPECS), "Per-image network.")
flags.DEFINE_enum("fusion", D.fusion, fusion.FUSIONS, "How a product's images are combined.")
flags.DEFINE_bool("packed", D.packed, "Run the backbone on real images only (skip padded slots).")
flags.DEFINE_integer("image_size", D.image_size, "Decoded image side (JPEGs are 180).", lower_bound=16)
flags.DEFINE_integer("crop_size", D.crop_size, "Random crop side for training, 0 for none.", lower_bound=0)
flags.DEFINE_bool("flip", D.flip, "Mirror each training image left-right at random (in the model, on the "
                  "accelerator); --noflip for pictures whose text must read the right way.")
flags.DEFINE_string("weights", D.weights, '"" (random init), "imagenet" or a .weights.h5 file.')
flags.DEFINE_string("init_from", D.init_from, "Start from a trained model: a model_dir (its model.keras) or a "
                    ".keras file (e.g. MODEL_DIR/best.keras). Any other flag may differ (image size, crop, "
                    "schedule, data); a head whose classes differ is re-initialised, and said. Ignored when "
                    "resuming from this model_dir's backup.")
flags.DEFINE_float("dropout", D.dropout, "Dropout before the classifier.", lower_bound=0, upper_bound=0.9)
flags.DEFINE_float("bn_momentum", D.bn_momentum, "BatchNorm moving-average momentum: the statistics trail the "
                   "weights by ~1/(1 - momentum) steps, so short runs want ~0.9.", lower_bound=0, upper_bound=0.999)

flags.DEFINE_integer("epochs", D.epochs, "Training epochs.", lower_bound=1)
flags.DEFINE_integer("batch_size", D.batch_size, "Global batch (products), split across replicas.", lower_bound=1)
flags.DEFINE_integer("steps_per_epoch", D.steps_per_epoch, "0: train products // batch_size.", lower_bound=0)
flags.DEFINE_integer("validation_steps", D.validation_steps, "0: the whole val split.", lower_bound=0)
flags.DEFINE_enum("optimizer", D.optimizer, optimization.OPTIMIZERS, "adamw, or sgd with Nesterov momentum.")
flags.DEFINE_float("base_lr", D.base_lr, "Peak learning rate per 256 products of global batch.", lower_bound=0)
flags.DEFINE_float("warmup_epochs", D.warmup_epochs, "Linear warmup length before the cosine decay.", lower_bound=0)
flags.DEFINE_float("min_lr_ratio", D.min_lr_ratio, "Final learning rate as a fraction of the peak.", lower_bound=0)
flags.DEFINE_float("weight_decay", D.weight_decay, "Decoupled weight decay (not on biases/BN).", lower_bound=0)
flags.DEFINE_float("momentum", D.momentum, "SGD momentum.", lower_bound=0, upper_bound=1)
flags.DEFINE_float("label_smoothing", D.label_smoothing, "Label smoothing of every head.", lower_bound=0, upper_bound=1)
flags.DEFINE_float("aux_loss_weight", D.aux_loss_weight, "Weight of the level1/level2 heads (0: none).", lower_bound=0)

flags.DEFINE_enum("precision", D.precision, config.PRECISIONS, "Keras dtype policy.")
flags.DEFINE_bool("jit_compile", D.jit_compile, "XLA-compile the train step.")
flags.DEFINE_integer("steps_per_execution", D.steps_per_execution, "Train steps per tf.function call.", lower_bound=1)
flags.DEFINE_integer("cpu_devices", D.cpu_devices, "Split the CPU into N logical devices (MirroredStrategy "
                     "on a machine without GPUs); 0 or 1: one device.", lower_bound=0)
flags.DEFINE_integer("shuffle_buffer", D.shuffle_buffer, "Products in the shuffle buffer.", lower_bound=1)
flags.DEFINE_integer("seed", D.seed, "Seed of everything random: initial weights, file order, shuffle, crops, "
                     "mirrors. 0: one is drawn at first start and recorded in train_config.json, so a resumed run "
                     "reads exactly the batches it would have read uninterrupted.", lower_bound=0)
flags.DEFINE_bool("deterministic", D.deterministic, "Deterministic ops too "
                  "(tf.config.experimental.enable_op_determinism): two runs of one seed, or a run killed and "
                  "resumed, end with bit-identical weights. Slower; README: Interrupted?")
flags.DEFINE_string("data_service", D.data_service, "grpc://HOST:PORT of a tf.data service dispatcher (python -m "
                    "model.data_service dispatcher): the training stream (read, decode, crop, batch) runs on its "
                    "workers, which must see --data_dir at the same path; validation stays here. Empty: all "
                    "input on this host.")
flags.DEFINE_bool("skip_corrupt_records", D.skip_corrupt_records, "Read past damaged shards: the rest of each "
                  "damaged file is skipped, named once and counted in train_state.json (one read of the shards "
                  "first); without it a damaged shard stops training with one line naming it.")

flags.DEFINE_integer("bn_recalibration_steps", D.bn_recalibration_steps, "After training, re-estimate "
                     "BatchNorm statistics on this many training batches (0: keep the moving averages).",
                     lower_bound=0)
flags.DEFINE_integer("backup_every_steps", D.backup_every_steps, "Back up the training state every N steps.",
                     lower_bound=1)
flags.DEFINE_string("profile_batches", D.profile_batches, 'Profile optimizer steps "START,STOP" (1-based, '
                    'whatever --steps_per_execution) into logs/train: TensorBoard\'s Profile tab.')
flags.DEFINE_integer("log_every_steps", D.log_every_steps, "TensorBoard scalars every N optimizer steps (loss, "
                     "top-1, learning rate, products/s) besides the per-epoch ones; 0: per epoch only.", lower_bound=0)
flags.DEFINE_bool("expect_gpus", D.expect_gpus, "A GPU configuration: warn at start when TensorFlow sees no GPU.")
flags.DEFINE_integer("sample_products", D.sample_products, "Products in the TensorBoard sample grid.", lower_bound=0)
flags.DEFINE_bool("input_check", D.input_check, "At start, measure what the model consumes (one cached batch) and "
                  "what the input delivers, and say whether the input keeps up; also gives step_input_wait.")
flags.DEFINE_integer("export_top_k", D.export_top_k, "Categories returned by the SavedModel.", lower_bound=1)
flags.DEFINE_bool("export_flip_tta", D.export_flip_tta, "The SavedModels average each product's predictions with "
                  "those of its mirror image, as evaluate.py --flip_tta does (twice the serving compute).")
flags.DEFINE_integer("verbose", D.verbose, "Keras fit verbosity: 1 progress bar, 2 one line an epoch.")

flags.mark_flags_as_required(["data_dir", "model_dir"])


cli.check_folder_flags(model_must_exist=False)


@flags.validator("profile_batches", message='--profile_batches must be "START,STOP" (e.g. 10,20) or empty')
def _profile_range(value):
    if not value:
        return True
    parts = value.split(",")
    return len(parts) == 2 and all(p.strip().isdigit() for p in parts) and 0 < int(parts[0]) <= int(parts[1])


@flags.validator("data_service")
def _data_service_address(value):
    if value:
        from model.data_service import probe

        try:
            probe.parse_service(value)
        except ValueError as error:
            raise flags.ValidationError(f"--data_service: {error}") from None
    return True


@flags.multi_flags_validator(["batch_size", "cpu_devices"])
def _batch_divisible(values):
    try:
        distribution.check_batch_divisible(values["batch_size"], distribution.num_replicas_for(values["cpu_devices"]))
    except ValueError as error:
        raise flags.ValidationError(str(error)) from None
    return True


@flags.multi_flags_validator(["jit_compile", "cpu_devices"], message="--jit_compile cannot run on logical CPU "
                             "devices (XLA sees one CPU: variables on CPU:1 are unreachable from CPU:0): drop "
                             "--jit_compile or --cpu_devices")
def _no_xla_on_logical_cpus(values):
    return not (values["jit_compile"] and values["cpu_devices"] > 1)


def flags_file_text() -> str:
    """The effective flags of this program, in flagfile format (re-usable with --flagfile)."""
    own = FLAGS.get_flags_for_module(sys.modules[__name__])
    return "".join(flag.serialize() + "\n" for flag in sorted(own, key=lambda fl: fl.name))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.quiet_logs()
    cfg = config.TrainConfig(**{f.name: FLAGS[f.name].value for f in dataclasses.fields(config.TrainConfig)})
    try:
        state = loop.train(cfg, flags_text=flags_file_text())
    except errors.UserError as error:
        sys.exit(f"train.py: error: {error}")
    except errors.Interrupted as stop:
        print(f"train.py: {stop}", file=sys.stderr, flush=True)
        sys.exit(128 + stop.signum)
    final = state.get("final", {})
    val = state.get("final_val", {}).get(loop.TOP1)
    print(
        f"Done: {state['epochs']} epochs, {state['optimizer_iterations']} optimizer steps; last epoch train top-1 "
        f"{final.get(loop.TOP1, float('nan')):.4f}, {final.get('products_per_second', float('nan')):.0f} "
        f"products/s" + (f"; final model val top-1 {val:.4f}" if val is not None else "")
    )


if __name__ == "__main__":
    app.run(main)
