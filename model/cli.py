"""What train.py and evaluate.py share: the environment TensorFlow reads at import, quiet logs,
their flags (made from a config dataclass's fields) and the checks of their folder flags.

Importing this module does not load TensorFlow, so `configure_environment` can run first.
"""

import dataclasses
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


def define_flags(config_class, module, flag_values=None) -> None:
    """One flag a field of config_class (model/config.py), with the field's default, help, bounds
    and choices, registered as `module`'s own (pass sys.modules[__name__]): absl's --help lists
    only the main module's flags, and train.py's flags.txt is the flags of its module."""
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    # absl names the main module by its file, as --help and get_flags_for_module do.
    module_name = sys.argv[0] if module.__name__ == "__main__" else module.__name__
    for field in dataclasses.fields(config_class):
        meta = field.metadata
        default = None if field.default is dataclasses.MISSING else field.default
        if default is None and meta.get("flag_none") is not None:
            default = meta["flag_none"]
        kind = field.type.split(" | ")[0]  # "int | None": an integer flag (annotations are strings here)
        bounds = {name: meta[name] for name in ("lower_bound", "upper_bound") if meta.get(name) is not None}
        common = {"module_name": module_name, "flag_values": flag_values}
        if meta.get("choices"):
            flags.DEFINE_enum(field.name, default, list(meta["choices"]), meta["help"], **common)
        elif kind == "bool":
            flags.DEFINE_bool(field.name, default, meta["help"], **common)
        elif kind == "int":
            flags.DEFINE_integer(field.name, default, meta["help"], **bounds, **common)
        elif kind == "float":
            flags.DEFINE_float(field.name, default, meta["help"], **bounds, **common)
        elif kind == "str":
            flags.DEFINE_string(field.name, default, meta["help"], **common)
        else:
            raise TypeError(f"{config_class.__name__}.{field.name}: no flag type for {field.type!r}")


def config_from_flags(config_class, flag_values=None):
    """config_class filled from the parsed flags of its fields."""
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    return config_class(**{field.name: flag_values[field.name].value for field in dataclasses.fields(config_class)})


def check_folder_flags(*, model_must_exist: bool, flag_values=None) -> None:
    """Registers the checks of --data_dir (and of --model_dir when it must hold a trained model:
    every folder of a comma-separated list, an ensemble's, the first without one named), in
    flag_values (absl's FLAGS by default)."""
    from absl import flags

    flag_values = flags.FLAGS if flag_values is None else flag_values
    flags.register_validator(
        "data_dir", has_metadata,
        message=f"--data_dir has no {record_schema.METADATA_FILE}: point it at a beam_convert output folder",
        flag_values=flag_values)
    if model_must_exist:
        def every_model_trained(text) -> bool:
            for model_dir in (text or "").split(","):
                if model_dir.strip() and not has_model(model_dir.strip()):
                    raise flags.ValidationError(f"--model_dir {model_dir.strip()} has no {MODEL_FILE}: "
                                                "train first (python train.py ...)")
            return True

        flags.register_validator("model_dir", every_model_trained, flag_values=flag_values)


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
