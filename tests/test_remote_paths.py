"""Every path option works on any filesystem TensorFlow knows: the same code path as gs://.

In-process on TensorFlow's ram:// filesystem (train -> evaluate -> submission, data and model both
there), and the commands with file:// URIs, as a user types them.
"""

import csv
import io
import os
import subprocess
import sys

import tensorflow as tf

import record_schema
from model import evaluation, training
from tests.record_helpers import REPO, write_data_dir

TINY = dict(backbone="tiny", image_size=32, batch_size=8, epochs=1, steps_per_epoch=2, sample_products=2,
            bn_recalibration_steps=1, fusion="mean", log_every_steps=1)


def copy_tree(source: str, destination: str) -> None:
    tf.io.gfile.makedirs(destination)
    for name in tf.io.gfile.listdir(source):
        tf.io.gfile.copy(os.path.join(source, name), os.path.join(destination, name), overwrite=True)


def test_train_evaluate_submission_on_ram_filesystem(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # a path mistaken for a local one would appear here
    write_data_dir(str(tmp_path / "local_test"), val_name="test")
    copy_tree(write_data_dir(str(tmp_path / "local")), "ram://remote/data")
    copy_tree(str(tmp_path / "local_test"), "ram://remote/test")

    training.train(training.TrainConfig(data_dir="ram://remote/data", model_dir="ram://remote/model", **TINY))
    for name in ("model.keras", "labels.csv", "train_config.json", "train_state.json", "export/saved_model.pb"):
        assert tf.io.gfile.exists(f"ram://remote/model/{name}"), name
    assert tf.io.gfile.glob("ram://remote/model/logs/train_steps/*tfevents*")

    summary = evaluation.evaluate(data_dir="ram://remote/test", model_dir="ram://remote/model", split="test",
                                  batch_size=8)
    with tf.io.gfile.GFile("ram://remote/model/eval_test/submission.csv") as f:
        rows = list(csv.reader(io.StringIO(f.read())))
    assert rows[0] == ["_id", "category_id"] and len(rows) - 1 == summary["products"] == 17
    assert tf.io.gfile.exists("ram://remote/model/eval_test/report.png")
    assert os.listdir(tmp_path) == ["local_test", "local"] or sorted(os.listdir(tmp_path)) == ["local", "local_test"]


def test_commands_take_file_uris_and_leave_no_stray_local_folder(tmp_path):
    data = write_data_dir(str(tmp_path / "data"))
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"}
    flags = ["--backbone=tiny", "--image_size=32", "--batch_size=8", "--epochs=1", "--steps_per_epoch=2",
             "--sample_products=0", "--bn_recalibration_steps=1", "--fusion=mean"]
    before = set(os.listdir(REPO))
    trained = subprocess.run([sys.executable, "train.py", f"--data_dir=file://{data}",
                              f"--model_dir=file://{tmp_path}/model", *flags],
                             cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert trained.returncode == 0, trained.stderr[-2000:]
    assert (tmp_path / "model" / "model.keras").exists() and (tmp_path / "model" / "flags.txt").exists()
    evaluated = subprocess.run([sys.executable, "evaluate.py", f"--data_dir=file://{data}",
                                f"--model_dir=file://{tmp_path}/model", "--split=val"],
                               cwd=REPO, capture_output=True, text=True, timeout=300, env=env)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    assert (tmp_path / "model" / "eval_val" / "metrics.json").exists()
    assert set(os.listdir(REPO)) == before  # no "file:" folder or other stray output
    assert record_schema.LABELS_FILE in os.listdir(tmp_path / "model")
