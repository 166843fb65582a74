"""Issue 20, the trainer's side: one run per model_dir, real signals, a full disk, unchecked
shards, paths that differ only in spelling, and the best score across a resume.

The real processes (a second trainer refused, SIGKILL, SIGTERM, resume) are one campaign in
test_model_training_run.py; here the lock, the checks and a full disk (a small tmpfs) in-process.
"""

import contextlib
import json
import os
import subprocess
import sys

import numpy as np
import pytest

from model import config, errors
from model.training import callbacks as callbacks_lib
from model.training import loop, run_lock, run_state
from tests.record_helpers import write_data_dir

pytestmark = pytest.mark.slow


def test_a_dead_holder_is_told_from_a_live_one(tmp_path):
    me = run_lock._this_process()
    assert run_lock.holder_alive(me)
    assert not run_lock.holder_alive({**me, "process_start": "1"})  # the pid now belongs to another process
    child = subprocess.Popen([sys.executable, "-c", "pass"])
    child.wait()
    assert not run_lock.holder_alive({**me, "pid": child.pid, "process_start": ""})
    other_host = {**me, "host": "elsewhere"}
    assert run_lock.holder_alive(other_host)  # heartbeat fresh
    assert not run_lock.holder_alive(other_host, now=me["heartbeat"] + run_lock.STALE_SECONDS + 1)


@pytest.mark.parametrize("content", [b"", b"{\"pid\": 12", b"\xff\x00garbage", b"[]"])
def test_an_unreadable_lock_is_taken_over_in_one_line(tmp_path, content):
    """Issue 28 item 2: an empty or damaged run.lock used to block its model_dir for good
    ("another trainer is starting on it at the same time")."""
    lock = tmp_path / "run.lock"
    lock.write_bytes(content)
    lines = []
    with run_lock.hold(str(tmp_path), log=lambda line, flush=False: lines.append(line)):
        assert json.loads(lock.read_text())["pid"] == os.getpid()
    assert lines == [f"Taking over {lock}: it cannot be read (empty or damaged), so no live trainer holds it"]
    assert not lock.exists() and os.listdir(tmp_path) == []


def test_a_full_disk_at_start_leaves_no_lock(small_disk):
    """The exclusive create used to succeed and its write fail, leaving an empty run.lock."""
    model_dir = os.path.join(small_disk, "m")
    os.mkdir(model_dir)
    with contextlib.suppress(OSError), open(os.path.join(small_disk, "filler"), "wb") as f:
        f.write(b"\0" * 4 * 1024 * 1024)  # fill the 3 MB disk to the last byte
        f.flush()
    with pytest.raises(errors.UserError) as failure:
        with run_lock.hold(model_dir):
            pass
    assert "No space left on device" in str(failure.value)
    assert os.listdir(model_dir) == []


@pytest.mark.parametrize("split,shards,message", [
    ("val", 1, "no val shards in"),  # used to train without validation, saying only "no val split"
    ("val", 2, "1 val shard(s) missing: val-00000-of-00002.tfrecord"),  # used to validate on half
    ("train", 2, "1 train shard(s) missing: train-00000-of-00002.tfrecord"),
])
def test_training_checks_every_split_it_reads(tmp_path, split, shards, message):
    damaged = write_data_dir(str(tmp_path / "data"), shards=shards)
    os.remove(os.path.join(damaged, sorted(p for p in os.listdir(damaged) if p.startswith(split + "-"))[0]))
    cfg = config.TrainConfig(data_dir=damaged, model_dir=str(tmp_path / "m"), backbone="tiny", image_size=32,
                             batch_size=8, epochs=1, steps_per_epoch=1, sample_products=0)
    with pytest.raises(errors.UserError) as failure:
        loop.train(cfg)
    assert message in str(failure.value)
    assert not os.path.exists(str(tmp_path / "m" / "backup"))


@pytest.mark.parametrize("saved,now,differs", [
    ("/data/run", "/data/run/", False),
    ("/data/run", "/data/./run", False),
    ("gs://b/data", "gs://b/data/", False),
    ("/data/run", "/data/other", True),
])
def test_paths_are_compared_normalised(saved, now, differs):
    cfg = config.TrainConfig(data_dir=now, model_dir="m")
    saved_config = {**config.dataclasses.asdict(cfg), "data_dir": saved}
    assert bool(run_state.settings_differences(saved_config, cfg)) == differs


@pytest.mark.parametrize("saved,now,differs", [
    ("data", "{cwd}/data", False),  # an older run folder's relative record, resumed from its own cwd
    ("{cwd}/data", "data", False),
    ("{cwd}/data", "../{name}/data/", False),
    ("{cwd}/data", "other", True),
    ("file:///data/run", "file:///data/run", False),  # URIs as given
    ("gs://b/data", "gs://b/other", True),
])
def test_relative_and_absolute_spellings_are_one_data_dir(tmp_path, monkeypatch, saved, now, differs):
    """Issue 28 item 4: --data_dir=DIR and --data_dir=/abs/DIR counted as other settings."""
    monkeypatch.chdir(tmp_path)
    saved, now = (p.format(cwd=tmp_path, name=tmp_path.name) for p in (saved, now))
    cfg = config.TrainConfig(data_dir=now, model_dir="m", init_from="runs/a")
    saved_config = {**config.dataclasses.asdict(cfg), "data_dir": saved, "init_from": str(tmp_path / "runs/a")}
    assert bool(run_state.settings_differences(saved_config, cfg)) == differs


def test_paths_are_recorded_resolved(tmp_path, monkeypatch):
    """train_config.json names the run's folders from any working directory (evaluate.py reads
    its data_dir); URIs are recorded as given."""
    monkeypatch.chdir(tmp_path)
    (tmp_path / "data").mkdir()
    (tmp_path / "data" / "labels.csv").write_text("label,category_id\n")
    (tmp_path / "m").mkdir()
    cfg = config.TrainConfig(data_dir="data/", model_dir="./m", init_from="gs://b/runs/a")
    loop._write_run_files(cfg, loop.multi_image.ModelConfig(num_classes=2), "", replicas=1)
    with open(tmp_path / "m" / "train_config.json") as f:
        train = json.load(f)["train"]
    assert (train["data_dir"], train["model_dir"], train["init_from"]) == (
        str(tmp_path / "data"), str(tmp_path / "m"), "gs://b/runs/a")
    monkeypatch.chdir(tmp_path / "data")  # resumed from elsewhere, the folders spelt from there
    assert run_state.settings_differences(train, config.dataclasses.replace(cfg, data_dir=".", model_dir="../m")) == []


class _Model:
    def __init__(self):
        self.saved = []

    def save(self, path):
        with open(path, "w") as f:
            f.write("model")
        self.saved.append(path)


def test_the_best_score_survives_a_resume(tmp_path):
    path, score_path = str(tmp_path / "best.keras"), str(tmp_path / "best.json")
    first = callbacks_lib.BestModel(path, score_path, "val_category_top1")
    first.set_model(_Model())
    first.on_epoch_end(0, {"val_category_top1": 0.6})
    first.on_epoch_end(1, {"val_category_top1": 0.4})
    with open(score_path) as f:
        assert json.load(f) == {"epoch": 1, "val_category_top1": 0.6}
    resumed = callbacks_lib.BestModel(path, score_path, "val_category_top1")  # a new process after a kill
    resumed.set_model(_Model())
    resumed.on_epoch_end(2, {"val_category_top1": 0.5})
    assert resumed.model.saved == []  # worse than the run's best: best.keras kept
    resumed.on_epoch_end(3, {"val_category_top1": 0.7})
    assert len(resumed.model.saved) == 1 and not os.path.exists(resumed.model.saved[0])  # renamed into place
    with open(score_path) as f:
        assert json.load(f)["epoch"] == 4


@pytest.fixture
def small_disk(tmp_path):
    """A 3 MB tmpfs: room for the data and the run's first files, not for its models."""
    mount = tmp_path / "disk"
    mount.mkdir()
    if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=3m", "tmpfs", str(mount)]).returncode != 0:
        pytest.fail("cannot mount a tmpfs (the disk-full tests run as root)")
    try:
        yield str(mount)
    finally:
        subprocess.run(["umount", "-l", str(mount)])


@pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # h5py, after the failed write
def test_a_full_disk_is_one_line_and_leaves_no_truncated_model(data_dir, small_disk):
    model_dir = os.path.join(small_disk, "m")
    cfg = config.TrainConfig(data_dir=data_dir, model_dir=model_dir, backbone="tiny", image_size=32, batch_size=8,
                             epochs=2, steps_per_epoch=2, sample_products=0, bn_recalibration_steps=1,
                             log_every_steps=0, input_check=False)
    filler = os.path.join(small_disk, "filler")
    with open(filler, "wb") as f:  # leave ~1 MB: the tiny model's backup (~2 MB with Adam) does not fit
        f.write(np.zeros(2 * 1024 * 1024, np.uint8).tobytes())
    with pytest.raises(errors.UserError) as failure:
        loop.train(cfg)
    message = str(failure.value)
    assert "No space left on device" in message and model_dir in message and "\n" not in message
    for name in ("model.keras", "best.keras", "train_state.json"):
        assert not os.path.exists(os.path.join(model_dir, name)), name
    assert not [n for n in os.listdir(os.path.join(model_dir, "backup")) if n.startswith(".partial-")]
