"""Train the multi-image product classifier (docs/FORMATS.md section 4).

    python train.py --flagfile=configs/cpu_tiny.flags --data_dir=DIR --model_dir=DIR [--flag=value ...]

Flags after --flagfile override it. Bad flags fail here, at parse time, before any data is read.
Re-running the same command after an interruption resumes from model_dir/backup/.
"""

import sys

from absl import app, flags

from model import cli, config, errors
from model.training import distribution, loop  # loads TensorFlow: the entry point configured it first

XLA_ON_LOGICAL_CPUS = ("--jit_compile cannot run on logical CPU devices (XLA sees one CPU: variables on CPU:1 are "
                       "unreachable from CPU:0): drop --jit_compile or --cpu_devices")


def define_flags(flag_values=None):
    """The flags, from TrainConfig's fields (defaults, help and bounds), and the checks that take
    more than one field; defined when the command runs (in flag_values: absl's FLAGS by default)."""
    values = flags.FLAGS if flag_values is None else flag_values
    cli.define_flags(config.TrainConfig, sys.modules[__name__], flag_values=values)
    flags.mark_flags_as_required(["data_dir", "model_dir"], flag_values=values)
    cli.check_folder_flags(model_must_exist=False, flag_values=values)
    flags.register_validator("profile_batches", _profile_range,
                             message='--profile_batches must be "START,STOP" (e.g. 10,20) or empty', flag_values=values)
    flags.register_validator("data_service", _data_service_address, flag_values=values)
    flags.register_multi_flags_validator(["batch_size", "cpu_devices"], _batch_divisible, flag_values=values)
    flags.register_multi_flags_validator(["jit_compile", "cpu_devices"], _no_xla_on_logical_cpus,
                                         message=XLA_ON_LOGICAL_CPUS, flag_values=values)


def _profile_range(value):
    if not value:
        return True
    parts = value.split(",")
    return len(parts) == 2 and all(p.strip().isdigit() for p in parts) and 0 < int(parts[0]) <= int(parts[1])


def _data_service_address(value):
    if value:
        from model.data_service import probe

        try:
            probe.parse_service(value)
        except ValueError as error:
            raise flags.ValidationError(f"--data_service: {error}") from None
    return True


def _batch_divisible(values):
    try:
        distribution.check_batch_divisible(values["batch_size"], distribution.num_replicas_for(values["cpu_devices"]))
    except ValueError as error:
        raise flags.ValidationError(str(error)) from None
    return True


def _no_xla_on_logical_cpus(values):
    return not (values["jit_compile"] and values["cpu_devices"] > 1)


def flags_file_text() -> str:
    """The effective flags of this program, in flagfile format (re-usable with --flagfile)."""
    own = flags.FLAGS.get_flags_for_module(sys.modules[__name__])
    return "".join(flag.serialize() + "\n" for flag in sorted(own, key=lambda fl: fl.name))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    cli.quiet_logs()
    cfg = cli.config_from_flags(config.TrainConfig)
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
