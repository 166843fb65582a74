"""What train.py and evaluate.py share: the environment TensorFlow reads at import, quiet logs,
and the checks of their folder flags.

Importing this module does not load TensorFlow, so `configure_environment` can run first.
"""

import os
import sys

import record_schema
from model.model_dir import MODEL_FILE, RunFolder


def configure_environment() -> None:
    """Call before TensorFlow is imported: it reads these once, at import. A user's own setting wins."""
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    # TensorFlow's pooling allocator instead of malloc: the input pipeline's 25 MB batches otherwise
    # page-fault afresh on every batch (30-45 faults a product; bench/RESULTS_pipeline.md).
    os.environ.setdefault("TF_CPU_ALLOCATOR_USE_BFC", "true")


def quiet_logs() -> None:
    """TensorFlow's INFO lines (one per all-reduce set-up, per SavedModel function...) would bury
    the epoch lines; some go through TensorFlow's logger, some straight through absl's."""
    import tensorflow as tf
    from absl import logging

    tf.get_logger().setLevel("WARNING")
    logging.set_verbosity(logging.WARNING)
    sys.unraisablehook = _without_h5py_write_failures(sys.unraisablehook)


def _without_h5py_write_failures(hook):
    """After a failed write (a full disk), h5py's file objects fail once more as they are
    collected, each printing a traceback: the failure itself is already reported in one line."""
    def unraisable(info):
        if "file write failed" in str(info.exc_value) or "h5py" in repr(info.object):
            return
        hook(info)

    return unraisable


def check_folder_flags(*, model_must_exist: bool) -> None:
    """Registers the checks of --data_dir (and of --model_dir when it must hold a trained model:
    every folder of a comma-separated list, an ensemble's, the first without one named)."""
    from absl import flags

    flags.register_validator(
        "data_dir", has_metadata,
        message=f"--data_dir has no {record_schema.METADATA_FILE}: point it at a beam_convert output folder")
    if model_must_exist:
        def every_model_trained(text) -> bool:
            for model_dir in (text or "").split(","):
                if model_dir.strip() and not has_model(model_dir.strip()):
                    raise flags.ValidationError(f"--model_dir {model_dir.strip()} has no {MODEL_FILE}: "
                                                "train first (python train.py ...)")
            return True

        flags.register_validator("model_dir", every_model_trained)


def _file_exists(path: str) -> bool:
    if "://" in path:  # gs://, s3://...: only TensorFlow's filesystems know them
        import tensorflow as tf

        return tf.io.gfile.exists(path)
    return os.path.isfile(path)


def has_metadata(data_dir) -> bool:
    """Flag check: --data_dir is a beam_convert output folder (None is left to the required check)."""
    return data_dir is None or _file_exists(os.path.join(data_dir, record_schema.METADATA_FILE))


def has_model(model_dir) -> bool:
    """Flag check: --model_dir holds a trained model (None is left to the required check)."""
    return model_dir is None or _file_exists(RunFolder(model_dir).model_file)
