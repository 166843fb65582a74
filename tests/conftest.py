"""Shared test set-up.

TensorFlow fixes its device list at first use, so the two logical CPU devices that the
MirroredStrategy tests need are configured here, before any test touches TensorFlow.
"""

import os
import pathlib

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")

import pytest  # noqa: E402
import tensorflow as tf  # noqa: E402

_cpus = tf.config.list_physical_devices("CPU")
tf.config.set_logical_device_configuration(
    _cpus[0], [tf.config.LogicalDeviceConfiguration(), tf.config.LogicalDeviceConfiguration()]
)

REPO = pathlib.Path(__file__).resolve().parent.parent
DATA = REPO / "data"

# The longest files first. `make test` hands whole files to whichever pytest-xdist worker is free
# (--dist loadfile, in collection order with --no-loadscope-reorder): a long file handed out last
# runs alone at the end while the other core idles. Order: the sum of each file's durations in
# `pytest --durations=0` (BUILD_NOTES.md, "Suite time"); a file not listed runs after these.
LONGEST_FIRST = (
    "test_model_data_service.py", "test_model_data_faults.py", "test_model_training_run.py",
    "test_model_training_multi_worker.py", "test_model_training_faults.py", "test_model_network.py",
    "test_docs_readme.py", "test_model_training_input_check.py", "test_model_evaluation_ensemble_run.py",
    "test_model_training.py", "test_model_training_resume.py", "test_model_predict.py",
)


def pytest_collection_modifyitems(items):
    rank = {name: i for i, name in enumerate(LONGEST_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable: tests keep their order


@pytest.fixture(scope="session")
def sample_bson() -> pathlib.Path:
    """The first 82 products of the real train.bson (110 JPEGs)."""
    return DATA / "train_example.bson"


@pytest.fixture(scope="session")
def categories_csv() -> pathlib.Path:
    """The real category_names.csv: 5,270 categories."""
    return DATA / "category_names.csv"


@pytest.fixture(scope="session")
def sample_output(tmp_path_factory) -> pathlib.Path:
    """data/train_example.bson converted once with the real categories (read-only: copy to change)."""
    from tests.convert_helpers import CATEGORIES_CSV, SAMPLE_BSON, convert

    out = tmp_path_factory.mktemp("sample")
    assert convert(f"--input={SAMPLE_BSON}", f"--output_dir={out}", f"--categories={CATEGORIES_CSV}") == 0
    return out
