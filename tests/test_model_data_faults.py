"""Every record accounted for: missing, truncated and corrupted shards in evaluate and train.

A tiny model is trained once in-process (library call); the faults are made on copies of a data
folder written by tests/record_helpers.py, three shards a split.
"""

import csv
import os
import re
import shutil
import signal
import subprocess
import sys

import numpy as np
import pytest

import record_schema
from model import config, errors
from model.evaluation import evaluate as evaluation
from model.input_pipeline import shards
from model.training import loop
from tests.record_helpers import REPO, sample_documents, write_data_dir

pytestmark = pytest.mark.slow

TINY = dict(backbone="tiny", image_size=32, batch_size=8, sample_products=0, bn_recalibration_steps=1,
            warmup_epochs=0.5, fusion="mean", input_check=False)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("faults")
    data = write_data_dir(str(root / "data"), shards=3)
    model_dir = str(root / "model")
    loop.train(config.TrainConfig(data_dir=data, model_dir=model_dir, epochs=1, steps_per_epoch=2, **TINY))
    test = write_data_dir(str(root / "test"), shards=3, val_name="test")
    return {"data": data, "model": model_dir, "test": test}


def damaged_copy(source, destination, damage):
    """A copy of the data folder with test-00001-of-00003 damaged: "delete", "truncate" (cut in the
    middle of a record), "flip" (one byte of a record's payload changed) or "boundary" (cut after
    the first record: well-formed, but short)."""
    shutil.copytree(source, destination)
    path = os.path.join(destination, record_schema.shard_name("test", 1, 3))
    data = open(path, "rb").read()
    if damage == "delete":
        os.remove(path)
    elif damage == "truncate":
        open(path, "wb").write(data[: len(data) // 2])
    elif damage == "flip":
        broken = bytearray(data)
        broken[len(data) // 2] ^= 0xFF
        open(path, "wb").write(bytes(broken))
    elif damage == "boundary":
        first_length = int.from_bytes(data[:8], "little")
        open(path, "wb").write(data[: 8 + 4 + first_length + 4])
    return path


def evaluate(trained, data_dir, output_dir, **options):
    return evaluation.evaluate(config.EvalConfig(data_dir=data_dir, model_dir=trained["model"], split="test",
                                          output_dir=output_dir, batch_size=8, **options))


def test_missing_shards_are_named():
    files = [f"/d/test-0000{i}-of-00004.tfrecord" for i in (0, 2)]
    assert shards.missing_shards(files) == ["test-00001-of-00004.tfrecord", "test-00003-of-00004.tfrecord"]
    assert shards.missing_shards([f"/d/val-0000{i}-of-00002.tfrecord" for i in (0, 1)]) == []


def test_submission_from_a_folder_with_a_deleted_shard_fails_naming_it(trained, tmp_path):
    data = str(tmp_path / "test")
    damaged_copy(trained["test"], data, "delete")
    with pytest.raises(errors.UserError, match=r"1 test shard\(s\) missing: test-00001-of-00003.tfrecord"):
        evaluate(trained, data, str(tmp_path / "out"))
    assert os.listdir(tmp_path) == ["test"]  # no output folder, no partial one


def test_a_shard_cut_at_a_record_boundary_is_counted_against_metadata(trained, tmp_path):
    data = str(tmp_path / "test")
    path = damaged_copy(trained["test"], data, "boundary")
    with pytest.raises(errors.UserError) as stopped:  # named by its size
        evaluate(trained, data, str(tmp_path / "out"))
    assert re.fullmatch(rf"{re.escape(path)}: \d+ bytes holding 1 records, metadata.json lists \d+ bytes and 6 "
                        "records: the shard was cut short or replaced; convert again", str(stopped.value))
    with pytest.raises(errors.UserError, match=r"the test shards hold \d+ records, metadata.json counts 17"):
        evaluate(trained, data, str(tmp_path / "out"), verify_records=True)


@pytest.mark.parametrize("damage, reported", [("truncate", "truncated record at"), ("flip", "corrupted record at")])
def test_damaged_shard_stops_evaluation_naming_it_or_is_skipped_and_counted(trained, tmp_path, damage, reported):
    data = str(tmp_path / "test")
    path = damaged_copy(trained["test"], data, damage)
    with pytest.raises(errors.UserError) as stopped:
        evaluate(trained, data, str(tmp_path / "out"))
    assert str(stopped.value).startswith(f"{path}: {reported}")
    assert "--skip_corrupt_records" in str(stopped.value)

    summary = evaluate(trained, data, str(tmp_path / "out"), skip_corrupt_records=True)
    assert summary["damaged_files"] == [path]
    assert summary["skipped_records"] >= 1
    assert summary["products"] + summary["skipped_records"] == 17
    # Still a row for every product of the split: the unreadable ones get the fallback category.
    with open(tmp_path / "out" / "submission.csv", newline="") as f:
        rows = list(csv.reader(f))[1:]
    all_ids = np.load(os.path.join(data, record_schema.product_ids_name("test"))).tolist()
    assert sorted(int(r[0]) for r in rows) == sorted(all_ids)
    assert summary["submission"]["unreadable_with_fallback"] == summary["skipped_records"]

    # The duplicate lookup reads the same records: it skips what the predictions skipped.
    train_data = tmp_path / "train_digests"
    train_data.mkdir()
    docs = sample_documents()
    np.savez(train_data / record_schema.IMAGE_DIGESTS_FILE,
             digest=np.array([record_schema.image_digest(d["imgs"][0]["picture"]) for d in docs], np.int64),
             category_id=np.array([d["category_id"] for d in docs], np.int64), count=np.ones(len(docs), np.int64))
    looked_up = evaluate(trained, data, str(tmp_path / "out_dup"), skip_corrupt_records=True, dup_lookup=True,
                         train_data_dir=str(train_data))
    assert looked_up["skipped_records"] == summary["skipped_records"]
    assert looked_up["dup_lookup_overridden"] == looked_up["products"]  # every readable product's picture


def test_a_failed_evaluation_leaves_the_earlier_output_as_it_was(trained, tmp_path):
    out = tmp_path / "out"
    evaluate(trained, trained["test"], str(out))
    before = {name: (out / name).read_bytes() for name in os.listdir(out)}
    data = str(tmp_path / "test")
    damaged_copy(trained["test"], data, "truncate")
    with pytest.raises(errors.UserError):
        evaluate(trained, data, str(out))
    assert {name: (out / name).read_bytes() for name in os.listdir(out)} == before
    assert sorted(os.listdir(tmp_path)) == ["out", "test"]  # no partial folder left


def run(script, *args):
    return subprocess.run([sys.executable, script, *args], cwd=REPO, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})


def test_commands_stop_on_a_truncated_shard_with_one_line_and_skip_it_when_asked(trained, tmp_path):
    """With file:// URIs for the folders (the code path of gs://). evaluate.py as a user types it,
    for what only a process shows (the one line, the exit status; train.py's own one line and exit
    status for a UserError are its campaign's, tests/test_model_training_run.py); training's stop,
    which comes before any model is built, and reading past the damage, which a flag only switches
    on, in-process."""
    data = str(tmp_path / "data")
    shutil.copytree(trained["data"], data)
    path = os.path.join(data, record_schema.shard_name("train", 1, 3))
    content = open(path, "rb").read()
    open(path, "wb").write(content[: len(content) // 2])
    settings = dict(TINY, data_dir=f"file://{data}", epochs=1, steps_per_epoch=3)

    before = set(os.listdir(REPO))
    with pytest.raises(errors.UserError) as stopped:
        loop.train(config.TrainConfig(**settings, model_dir=f"file://{tmp_path / 'm1'}"))
    assert str(stopped.value).startswith(f"file://{path}: truncated record at") and "\n" not in str(stopped.value)

    skipped = config.TrainConfig(**settings, model_dir=f"file://{tmp_path / 'm2'}", skip_corrupt_records=True)
    state = loop.train(skipped)
    assert state["skipped_records"]["train"] >= 1 and state["skipped_records"]["val"] == 0

    test = str(tmp_path / "test")
    damaged = damaged_copy(trained["test"], test, "truncate")
    evaluated = run("evaluate.py", f"--data_dir=file://{test}", f"--model_dir=file://{tmp_path / 'm2'}", "--split=test")
    assert evaluated.returncode == 1 and "Traceback" not in evaluated.stderr
    assert evaluated.stderr.strip().splitlines()[-1].startswith(f"evaluate.py: error: file://{damaged}: truncated record at")
    evaluation.evaluate(config.EvalConfig(data_dir=f"file://{test}", model_dir=f"file://{tmp_path / 'm2'}",
                                          split="test", skip_corrupt_records=True))
    assert (tmp_path / "m2" / "eval_test" / "submission.csv").exists()
    assert set(os.listdir(REPO)) == before  # no "file:" folder or other stray output


@pytest.fixture
def mounted(tmp_path):
    """mount(options) -> a tmpfs of this test's own (as root), unmounted after."""
    mounts = []

    def mount(options):
        path = tmp_path / f"disk{len(mounts)}"
        path.mkdir()
        if subprocess.run(["mount", "-t", "tmpfs", "-o", options, "tmpfs", str(path)]).returncode != 0:
            pytest.fail("cannot mount a tmpfs (the disk tests run as root)")
        mounts.append(path)
        return path

    yield mount
    for path in mounts:
        subprocess.run(["umount", "-l", str(path)])


@pytest.mark.parametrize("options,reason", [("size=64k", "No space left on device"),
                                            ("size=1m,ro", "Read-only file system")])
def test_a_full_or_unwritable_output_folder_is_one_line(trained, mounted, options, reason):
    disk = mounted(options)
    if "ro" not in options.split(","):
        (disk / "filler").write_bytes(b"\0" * (60 << 10))  # room left for metrics.json, not for report.png
    with pytest.raises(errors.UserError) as failure:
        evaluate(trained, trained["test"], str(disk / "eval"))
    message = str(failure.value)
    assert str(disk) in message and reason in message and "\n" not in message
    assert not (disk / "eval").exists()


def test_the_classes_are_compared_before_predicting(trained, tmp_path, monkeypatch):
    from model.evaluation import predict

    other = str(tmp_path / "other")
    shutil.copytree(trained["test"], other)
    labels = os.path.join(other, record_schema.LABELS_FILE)
    header, first, *rest = open(labels).read().splitlines()
    label, _, tree = first.split(",", 2)
    open(labels, "w").write("\n".join([header, f"{label},999999,{tree}", *rest]) + "\n")  # another category
    monkeypatch.setattr(predict, "predict_top_k", lambda *a, **k: pytest.fail("predicted before comparing"))
    with pytest.raises(errors.UserError, match="labels.csv differs from the model's classes"):
        evaluation.evaluate(config.EvalConfig(data_dir=other, model_dir=trained["model"], split="val", batch_size=8))


def test_sigterm_stops_an_evaluation_cleanly(trained, tmp_path):
    out = tmp_path / "eval"
    run = subprocess.Popen([sys.executable, "evaluate.py", f"--data_dir={trained['test']}",
                            f"--model_dir={trained['model']}", "--split=test", f"--output_dir={out}", "--batch_size=1"],
                           cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                           env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONUNBUFFERED": "1"})
    assert run.stdout.readline().startswith("Evaluating "), run.stderr.read()[-2000:]  # predicting from here
    run.send_signal(signal.SIGTERM)
    _, err = run.communicate(timeout=120)
    assert run.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "Traceback" not in err
    assert err.strip().splitlines()[-1] == ("evaluate.py: stopped by SIGTERM; nothing written (an earlier "
                                            "evaluation in the output folder is kept)")
    assert sorted(os.listdir(tmp_path)) == []  # no output folder, no partial one
