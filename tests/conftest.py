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
