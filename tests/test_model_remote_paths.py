"""Every path option works on any filesystem TensorFlow knows: the same code path as gs://.

In-process on TensorFlow's ram:// filesystem (train -> evaluate -> submission, data and model both
there). The commands with file:// URIs, as a user types them, are run by
tests/test_model_data_faults.py::test_commands_stop_on_a_truncated_shard_with_one_line_and_skip_it_when_asked.
"""

import csv
import json
import io
import os

import pytest
import tensorflow as tf

from model import config
from model.evaluation import evaluate as evaluation
from model.training import loop
from tests.record_helpers import write_data_dir

pytestmark = pytest.mark.slow

TINY = dict(backbone="tiny", image_size=32, batch_size=8, epochs=1, steps_per_epoch=2, sample_products=2,
            bn_recalibration_steps=1, fusion="mean", log_every_steps=1, input_check=False)


def copy_tree(source: str, destination: str) -> None:
    tf.io.gfile.makedirs(destination)
    for name in tf.io.gfile.listdir(source):
        tf.io.gfile.copy(os.path.join(source, name), os.path.join(destination, name), overwrite=True)


def read(path: str, mode: str = "r"):
    with tf.io.gfile.GFile(path, mode) as f:
        return f.read()


def walk(top: str) -> list[str]:
    """Every file below top (ram:// also lists a sibling "top_best" as "_best": not a file, left out)."""
    paths = [os.path.join(folder, name) for folder, _, names in tf.io.gfile.walk(top) for name in names]
    return [path for path in paths if tf.io.gfile.exists(path)]


def test_train_evaluate_submission_on_ram_filesystem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would appear here
    write_data_dir(str(tmp_path / "local_test"), val_name="test")
    copy_tree(write_data_dir(str(tmp_path / "local")), "ram://remote/data")
    copy_tree(str(tmp_path / "local_test"), "ram://remote/test")

    loop.train(config.TrainConfig(data_dir="ram://remote/data", model_dir="ram://remote/model", **TINY))
    for name in ("model.keras", "labels.csv", "train_config.json", "train_state.json", "export/saved_model.pb"):
        assert tf.io.gfile.exists(f"ram://remote/model/{name}"), name
    assert tf.io.gfile.glob("ram://remote/model/logs/train_steps/*tfevents*")
    # One epoch: the best model is the final one, whose export is copied to export_best/ file by file.
    assert json.loads(read("ram://remote/model/train_state.json"))["best_epoch"] == 1
    exported = sorted(path[len("ram://remote/model/export"):] for path in walk("ram://remote/model/export"))
    assert exported and exported == sorted(path[len("ram://remote/model/export_best"):]
                                           for path in walk("ram://remote/model/export_best"))
    assert read("ram://remote/model/export_best/saved_model.pb", "rb") == read("ram://remote/model/export/saved_model.pb", "rb")
    assert tf.io.gfile.exists("ram://remote/model/best.keras")

    summary = evaluation.evaluate(config.EvalConfig(data_dir="ram://remote/test", model_dir="ram://remote/model",
                                             split="test", batch_size=8))
    with tf.io.gfile.GFile("ram://remote/model/eval_test/submission.csv") as f:
        rows = list(csv.reader(io.StringIO(f.read())))
    assert rows[0] == ["_id", "category_id"] and len(rows) - 1 == summary["products"] == 17
    assert tf.io.gfile.exists("ram://remote/model/eval_test/report.png")
    assert sorted(os.listdir(tmp_path)) == ["local", "local_test"]  # nothing written locally
