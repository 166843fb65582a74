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
