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

from model import cli, errors  # neither loads TensorFlow

cli.configure_environment()  # before TensorFlow loads: it reads these at import

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "beam_convert output folder holding the split.")
flags.DEFINE_string("model_dir", None, "train.py's model_dir (model.keras, labels.csv, train_config.json); "
                    "several, comma-separated, evaluate their ensemble.")
flags.DEFINE_string("checkpoint", "final", "final (model.keras) or best (best.keras: the epoch with the best val "
                    "top-1); one for every model or one per model, comma-separated.")
flags.DEFINE_string("ensemble_weights", None, "One weight per model, comma-separated (default: equal).")
flags.DEFINE_enum("ensemble_mean", "arithmetic", ["arithmetic", "geometric"],
                  "How an ensemble combines its models' class probabilities.")
flags.DEFINE_integer("save_top_k", 0, "Also write top_k.npz: each product's K best classes and probabilities "
                     "(0: not written).", lower_bound=0)
flags.DEFINE_enum("split", "val", ["train", "val", "test"], "Split to evaluate.")
flags.DEFINE_string("output_dir", None, "Default: MODEL_DIR/eval_SPLIT/ (eval_SPLIT_best/ with --checkpoint=best; "
                    "the first model's eval_SPLIT_ensemble/ for an ensemble).")
flags.DEFINE_integer("batch_size", 64, "Products per prediction batch.", lower_bound=1)
flags.DEFINE_bool("flip_tta", False, "Average predictions with the left-right mirrored images.")
flags.DEFINE_bool("dup_lookup", False, "Where an image is in the training set, predict with that image's "
                  "training categories (train_image_digests.npz of the training data folder).")
flags.DEFINE_enum("dup_lookup_level", "image", ["image", "product"],
                  "image: a matched picture counts as its training labels, fused with the model's prediction "
                  "from the product's other pictures; product: the matched categories replace the product's ranking.")
flags.DEFINE_string("train_data_dir", None, "Training data folder (digests, class frequencies); "
                    "default: the one the model was trained on.")
flags.DEFINE_bool("skip_corrupt_records", False, "Read past damaged shards: the rest of each damaged file is "
                  "skipped, named once and counted in metrics.json (skipped_records); without it a damaged "
                  "shard stops evaluation with one line naming it.")
flags.mark_flags_as_required(["data_dir", "model_dir"])
cli.check_folder_flags(model_must_exist=True)


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from model import signals
    from model.evaluation import evaluate as evaluation

    cli.quiet_logs()
    try:
        with signals.stop_requests():
            evaluation.evaluate(
                data_dir=FLAGS.data_dir, model_dir=FLAGS.model_dir, split=FLAGS.split, output_dir=FLAGS.output_dir,
                batch_size=FLAGS.batch_size, flip_tta=FLAGS.flip_tta, dup_lookup=FLAGS.dup_lookup,
                dup_lookup_level=FLAGS.dup_lookup_level, train_data_dir=FLAGS.train_data_dir,
                skip_corrupt_records=FLAGS.skip_corrupt_records, checkpoint=FLAGS.checkpoint,
                ensemble_weights=FLAGS.ensemble_weights, ensemble_mean=FLAGS.ensemble_mean,
                save_top_k=FLAGS.save_top_k,
            )
    except errors.UserError as error:
        sys.exit(f"evaluate.py: error: {error}")
    except errors.Interrupted as stop:
        print(f"evaluate.py: {stop}; nothing written (an earlier evaluation in the output folder is kept)",
              file=sys.stderr, flush=True)
        sys.exit(128 + stop.signum)


if __name__ == "__main__":
    app.run(main)
