"""Shared test set-up.

TensorFlow fixes its device list at first use, so the two logical CPU devices that the
MirroredStrategy tests need are configured here, before any test touches TensorFlow.
"""

import json
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
# runs alone at the end while the other core idles. The order comes from tests/durations.json,
# each file's seconds in the last run that stored them (`make durations`: pytest
# --store-durations); a file it does not know yet goes first, as if it were the longest.
DURATIONS_FILE = pathlib.Path(__file__).resolve().parent / "durations.json"


def pytest_addoption(parser):
    parser.addoption("--store-durations", action="store_true",
                     help=f"write each test file's seconds into {DURATIONS_FILE.name} (the order of later runs)")


def _known_durations() -> dict:
    try:
        return json.loads(DURATIONS_FILE.read_text())
    except (OSError, ValueError):
        return {}


def pytest_collection_modifyitems(items):
    seconds = _known_durations()
    items.sort(key=lambda item: -seconds.get(item.path.name, float("inf")))  # stable: tests keep their order


_file_seconds: dict = {}


def pytest_runtest_logreport(report):
    # On the controller (xdist forwards every worker's reports): setup, call and teardown, so a
    # module fixture's training run counts toward its file.
    name = pathlib.Path(report.fspath).name
    _file_seconds[name] = _file_seconds.get(name, 0.0) + report.duration


def pytest_sessionfinish(session, exitstatus):
    if hasattr(session.config, "workerinput") or not session.config.getoption("--store-durations"):
        return
    if exitstatus in (pytest.ExitCode.OK, pytest.ExitCode.TESTS_FAILED) and _file_seconds:  # a failure times too
        DURATIONS_FILE.write_text(json.dumps({name: round(value, 1) for name, value in
                                              sorted(_file_seconds.items(), key=lambda kv: -kv[1])}, indent=1) + "\n")


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


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory) -> str:
    """82 real products as a data folder written in a plain loop (tests/record_helpers.py), with a
    val split: read-only, copy to change."""
    from tests.record_helpers import write_data_dir

    return write_data_dir(str(tmp_path_factory.mktemp("data")))
