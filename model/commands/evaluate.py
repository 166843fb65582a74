"""Evaluate a trained model on one split of a beam_convert folder (docs/FORMATS.md section 4).

    python evaluate.py --data_dir=DIR --model_dir=DIR[,DIR...] --split=val|test [--output_dir=DIR]
        [--checkpoint=final|best] [--ensemble_weights=W,W] [--ensemble_mean=arithmetic|geometric]
        [--flip_tta] [--dup_lookup [--dup_lookup_level=image|product]] [--save_top_k=K]

Labelled splits: metrics.json (top1, top5, products, accuracy per image count, per level of the
category tree, most confused pairs, each ensemble member's figures) and report.png. test:
submission.csv `_id,category_id` with a row for every product of the input, rejected ones
included (most frequent training category). Several model folders make an ensemble: their class
probabilities are averaged, each model reading the images at its own size.
"""

import sys

from absl import app, flags

from model import cli, config, errors  # none loads TensorFlow


def define_flags(flag_values=None):
    """The flags, from EvalConfig's fields (defaults, help and bounds), defined when the command
    runs (in flag_values: absl's FLAGS by default)."""
    values = flags.FLAGS if flag_values is None else flag_values
    cli.define_flags(config.EvalConfig, sys.modules[__name__], flag_values=values)
    flags.mark_flags_as_required(["data_dir", "model_dir"], flag_values=values)
    cli.check_folder_flags(model_must_exist=True, flag_values=values)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from model import signals
    from model.evaluation import evaluate as evaluation
    from model.training import run_lock

    cli.quiet_logs()
    try:
        with signals.stop_requests():
            evaluation.evaluate(cli.config_from_flags(config.EvalConfig), trainer_of=run_lock.trainer_of,
                                hold_output=run_lock.hold_output)
    except errors.UserError as error:
        sys.exit(f"evaluate.py: error: {error}")
    except errors.Interrupted as stop:
        print(f"evaluate.py: {stop}; nothing written (an earlier evaluation in the output folder is kept)",
              file=sys.stderr, flush=True)
        sys.exit(128 + stop.signum)
