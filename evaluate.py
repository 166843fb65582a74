"""Evaluate a trained model on one split of a beam_convert folder (CONTRACT section 4).

    python evaluate.py --data_dir=DIR --model_dir=DIR --split=val|test [--output_dir=DIR]
        [--flip_tta] [--dup_lookup]

Labelled splits: metrics.json (top1, top5, products, accuracy per image count, per level of the
category tree, most confused pairs) and report.png. test: submission.csv `_id,category_id` with a
row for every product of the input, rejected ones included (most frequent training category).
"""

import os

from absl import app, flags, logging

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
# TensorFlow's pooling allocator instead of malloc: the input pipeline's 25 MB batches otherwise
# page-fault afresh on every batch (30-45 faults a product; bench/RESULTS_pipeline.md). Read once,
# at import, so it is set here and not in a library module.
os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")

FLAGS = flags.FLAGS
flags.DEFINE_string("data_dir", None, "beam_convert output folder holding the split.")
flags.DEFINE_string("model_dir", None, "train.py's model_dir (model.keras, labels.csv, train_config.json).")
flags.DEFINE_enum("split", "val", ["train", "val", "test"], "Split to evaluate.")
flags.DEFINE_string("output_dir", None, "Default: MODEL_DIR/eval_SPLIT/.")
flags.DEFINE_integer("batch_size", 64, "Products per prediction batch.", lower_bound=1)
flags.DEFINE_bool("flip_tta", False, "Average predictions with the left-right mirrored images.")
flags.DEFINE_bool("dup_lookup", False, "Where an image is in the training set, predict that image's "
                  "training categories (train_image_digests.npz of the training data folder).")
flags.DEFINE_string("train_data_dir", None, "Training data folder (digests, class frequencies); "
                    "default: the one the model was trained on.")
flags.mark_flags_as_required(["data_dir", "model_dir"])


@flags.validator("data_dir", message="--data_dir has no metadata.json: point it at a beam_convert output folder")
def _has_metadata(data_dir):
    return data_dir is None or os.path.isfile(os.path.join(data_dir, "metadata.json"))


@flags.validator("model_dir", message="--model_dir has no model.keras: train first (python train.py ...)")
def _has_model(model_dir):
    return model_dir is None or os.path.isfile(os.path.join(model_dir, "model.keras"))


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    import tensorflow as tf

    from model import evaluation

    tf.get_logger().setLevel("WARNING")
    logging.set_verbosity(logging.WARNING)
    evaluation.evaluate(
        data_dir=FLAGS.data_dir, model_dir=FLAGS.model_dir, split=FLAGS.split, output_dir=FLAGS.output_dir,
        batch_size=FLAGS.batch_size, flip_tta=FLAGS.flip_tta, dup_lookup=FLAGS.dup_lookup,
        train_data_dir=FLAGS.train_data_dir,
    )


if __name__ == "__main__":
    app.run(main)
