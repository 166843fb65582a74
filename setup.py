"""Cdiscount BSON -> TFRecords (Apache Beam) and a multi-image Xception trainer."""

import os

import setuptools

# Dataflow workers build this package from its sdist with no extras, so TensorFlow has to be a
# plain requirement; GPU machines choose their build through this variable, for example
#   CDISCOUNT_TENSORFLOW='tensorflow[and-cuda]' pip install -e .
TENSORFLOW = os.environ.get("CDISCOUNT_TENSORFLOW", "tensorflow-cpu") + ">=2.16,<2.22"

# Dataflow: Beam's GCP clients, and `build`, which Beam's stager runs to make the sdist that
# --setup_file ships to the workers.
GCP = ["apache-beam[gcp]>=2.60,<3", "build>=1"]

setuptools.setup(
    name="cdiscount-beam",
    version="0.1.0",
    description=__doc__,
    python_requires=">=3.11",
    # sample_data (the synthetic data generator) stays out of the sdist that Dataflow workers install.
    packages=setuptools.find_packages(include=["beam_convert", "beam_convert.*", "model", "model.*"]),
    # What both halves import (tests/test_layout.py SHARED): the record, and the stop on a signal.
    py_modules=["record_schema", "stop_signals"],
    install_requires=[
        TENSORFLOW,
        "keras>=3.5,<4",
        "tensorboard>=2.16,<2.22",  # tf.summary writes nothing without it (tensorflow-cpu 2.21 omits it)
        "tensorboard-plugin-profile>=2.20,<2.25",  # TensorBoard's Profile tab (--profile_batches)
        "apache-beam>=2.60,<3",
        "pymongo>=4.6,<5",  # its `bson` module; the standalone `bson` package on PyPI is another thing
        "absl-py>=2.1,<3",
        "numpy>=1.26,<3",
        "google-crc32c>=1.5,<2",  # Beam's and our TFRecord framing; pure-Python CRC is ~100x slower
        "pillow>=10,<13",
        "matplotlib>=3.8,<4",
    ],
    # The commands under names of their own, from any folder (README "Commands"); `python train.py`
    # and `python -m beam_convert` run the same functions.
    entry_points={"console_scripts": [
        "cdiscount-convert = beam_convert.__main__:run",
        "cdiscount-train = model.commands.console:train",
        "cdiscount-evaluate = model.commands.console:evaluate",
        "cdiscount-predict = model.commands.console:predict",
        "cdiscount-data-service = model.commands.console:data_service",
    ]},
    extras_require={
        # pytest-xdist: make test uses every core; psutil: peak memory in bench/; the gcp extra:
        # a test builds the Dataflow job (dry run).
        "test": ["pytest>=8,<10", "pytest-xdist>=3.5", "psutil>=5.9", *GCP],
        "gcp": GCP,
    },
)
