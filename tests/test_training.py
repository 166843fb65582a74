"""train.py and model.training: flags, a run killed and resumed, artefacts, serving, two workers in step.

The data is the real sample BSON written as records with record_schema in a plain loop, so these
tests do not depend on the converter. Everything runs the tiny backbone on 32x32 images.
"""

import glob
import json
import os
import signal
import socket
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import record_schema
from model import labels as labels_lib
from tests.record_helpers import sample_documents, write_data_dir

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TINY = ["--backbone=tiny", "--image_size=32", "--batch_size=8", "--sample_products=4", "--warmup_epochs=0.5",
        "--bn_recalibration_steps=2"]


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    return write_data_dir(str(tmp_path_factory.mktemp("data")))


def test_bad_flags_fail_at_start_with_one_line(data_dir, tmp_path):
    model_dir = tmp_path / "m"
    base = [f"--data_dir={data_dir}", f"--model_dir={model_dir}"]
    cases = [
        (["--model_dir=/tmp/x"], "--data_dir"),
        ([*base, "--fusion=median"], "--fusion=median: value should be one of"),
        ([*base, "--batch_size=7", "--cpu_devices=2"], "--batch_size=7 is not divisible by the 2 replicas: use a multiple of 2"),
        ([f"--data_dir={tmp_path}", f"--model_dir={model_dir}"], "--data_dir has no metadata.json"),
    ]
    # Concurrently: each one pays a TensorFlow import, nothing more.
    running = [subprocess.Popen([sys.executable, "train.py", *args], cwd=REPO, stdout=subprocess.PIPE,
                                stderr=subprocess.PIPE, text=True) for args, _ in cases]
    for (args, message), process in zip(cases, running):
        _, stderr = process.communicate(timeout=120)
        assert process.returncode != 0, args
        assert [line for line in stderr.splitlines() if message in line], (args, stderr[-2000:])
        assert "Traceback" not in stderr, args
    assert not model_dir.exists()  # nothing written before the flags are right


def kill_and_resume(data_dir, model_dir, extra_args, kill_when):
    """Runs 3 epochs of 6 steps, SIGKILLs the run once backup/progress.json satisfies kill_when,
    then runs the same command again to the end."""
    args = [sys.executable, "tests/slow_train.py", "0.4", f"--data_dir={data_dir}", f"--model_dir={model_dir}",
            *TINY, "--epochs=3", "--steps_per_epoch=6", *extra_args]
    progress = os.path.join(model_dir, "backup", "progress.json")
    first = subprocess.Popen(args, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                             env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    deadline = time.time() + 180
    killed_at = None
    while time.time() < deadline and first.poll() is None:
        try:
            with open(progress) as f:
                state = json.load(f)
        except (OSError, ValueError):
            state = None
        if state and kill_when(state):
            first.send_signal(signal.SIGKILL)
            killed_at = state
            break
        time.sleep(0.05)
    first_output = first.communicate(timeout=30)[0]
    assert killed_at, f"no backup to kill after:\n{first_output[-3000:]}"
    assert first.returncode == -signal.SIGKILL
    assert not os.path.exists(os.path.join(model_dir, "model.keras"))

    second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=240,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert second.returncode == 0, second.stderr[-3000:]
    with open(os.path.join(model_dir, "train_state.json")) as f:
        state = json.load(f)
    return {"model_dir": model_dir, "first": first_output, "second": second.stdout, "state": state,
            "killed_at": killed_at}


@pytest.fixture(scope="module")
def resumed_run(data_dir, tmp_path_factory):
    """Killed during epoch 2, after a mid-epoch backup, then resumed. One replica: tracing for two
    costs ~20 s more, and the 2-device strategy has its own test below."""
    return kill_and_resume(data_dir, str(tmp_path_factory.mktemp("model")),
                           ["--backup_every_steps=2", "--fusion=mean_max", "--profile_batches=2,3"],
                           lambda backup: backup["epoch"] >= 1 and backup["step_in_epoch"] >= 1)


def test_killed_run_resumes_mid_epoch(resumed_run):
    first, second, state = resumed_run["first"], resumed_run["second"], resumed_run["state"]
    assert "Epoch 1/3" in first and "Epoch 2/3" in first
    assert "1 replica on CPU (MirroredStrategy)" in second
    # Resumed in epoch 2 with the optimizer state of the backup, not from scratch.
    assert "Epoch 1/3" not in second
    assert "Epoch 2/3" in second and "Epoch 3/3" in second
    assert f"Resuming from {resumed_run['model_dir']}/backup: epoch 2/3" in second
    assert state["epochs"] == 3
    assert state["resumed_epoch"] == 1
    assert state["resumed_step"] > 6  # past epoch 1: the backup was taken inside epoch 2
    # The resumed epoch runs only its remaining steps: exactly an uninterrupted run's 3 x 6.
    assert state["optimizer_iterations"] == 3 * 6
    assert not os.path.exists(os.path.join(resumed_run["model_dir"], "backup"))


def test_kill_after_an_epoch_resumes_in_the_next_with_no_step_lost_or_repeated(data_dir, tmp_path):
    """No step backup comes before epoch 1 ends (every 100 steps): the epoch-end backup is all
    there is, and the run must continue from it in epoch 2."""
    run = kill_and_resume(data_dir, str(tmp_path / "m"), ["--backup_every_steps=100", "--fusion=mean",
                                                          "--sample_products=0"],
                          lambda backup: backup["epoch"] == 1 and backup["step_in_epoch"] == 0)
    assert run["killed_at"]["optimizer_step"] == 6
    assert f"Resuming from {run['model_dir']}/backup: epoch 2/3, optimizer step 6" in run["second"]
    assert "Epoch 1/3" not in run["second"] and "Epoch 2/3" in run["second"]
    assert run["state"]["optimizer_iterations"] == 3 * 6


def test_finished_run_with_other_settings_stops_with_one_line(resumed_run, tmp_path):
    model_path = os.path.join(resumed_run["model_dir"], "model.keras")
    before = os.path.getmtime(model_path)
    other_data = write_data_dir(str(tmp_path / "other"))
    result = subprocess.run([sys.executable, "train.py", f"--data_dir={other_data}",
                             f"--model_dir={resumed_run['model_dir']}", *TINY, "--epochs=3", "--steps_per_epoch=6",
                             "--fusion=max"], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert result.returncode == 1 and "Traceback" not in result.stderr
    line = result.stderr.strip().splitlines()[-1]
    assert line.startswith("train.py: error: ") and "holds a finished run with other settings" in line
    assert "--fusion=mean_max (now max)" in line and f"(now {other_data})" in line
    assert os.path.getmtime(model_path) == before


def test_artifacts_after_training(resumed_run):
    model_dir = resumed_run["model_dir"]
    for name in ("model.keras", "best.keras", "labels.csv", "train_config.json", "export/saved_model.pb"):
        assert os.path.exists(os.path.join(model_dir, name)), name
    tags = {}
    for run in ("train", "validation", "samples"):
        for path in glob.glob(os.path.join(model_dir, "logs", run, "*tfevents*")):
            for event in tf.compat.v1.train.summary_iterator(path):
                tags.setdefault(run, set()).update(v.tag for v in event.summary.value)
    assert {"epoch_loss", "epoch_category_top1", "epoch_category_top5", "epoch_learning_rate",
            "epoch_products_per_second"} <= tags["train"]
    assert "epoch_category_top1" in tags["validation"] and tags["samples"] == {"training_products"}
    assert glob.glob(os.path.join(model_dir, "logs", "train", "plugins", "profile", "*", "*.xplane.pb"))
    with open(os.path.join(model_dir, "flags.txt")) as f:
        flags_txt = f.read().splitlines()
    assert "--fusion=mean_max" in flags_txt and "--epochs=3" in flags_txt and "--batch_size=8" in flags_txt


SERVE = r"""
import json, sys, bson, numpy as np, tensorflow as tf
model_dir, bson_path = sys.argv[1:3]
docs = list(bson.decode_file_iter(open(bson_path, "rb")))[:6]
images = [[i["picture"] for i in d["imgs"]][:4] for d in docs]
mask = np.array([[1.0] * len(p) + [0.0] * (4 - len(p)) for p in images], np.float32)
images = np.array([p + [b""] * (4 - len(p)) for p in images], dtype=object)
serve = tf.saved_model.load(model_dir + "/export").signatures["serving_default"]
out = serve(images=tf.constant(images), mask=tf.constant(mask))
print(json.dumps({k: v.numpy().tolist() for k, v in out.items()}, default=lambda b: b.decode()))
"""


def test_savedmodel_serves_jpeg_bytes_in_fresh_process(resumed_run):
    model_dir = resumed_run["model_dir"]
    result = subprocess.run([sys.executable, "-c", SERVE, model_dir, os.path.join(REPO, "data", "train_example.bson")],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    known = set(labels_lib.read_labels(os.path.join(model_dir, "labels.csv")).category_ids.tolist())
    assert len(out["category_ids"]) == 6 and all(len(row) == 5 for row in out["category_ids"])
    assert all(c in known for row in out["category_ids"] for c in row)
    for row in out["probabilities"]:
        assert row == sorted(row, reverse=True) and 0 < sum(row) <= 1.0001
    assert out["valid"] == [True] * 6 and out["error"] == [""] * 6


SERVE_BAD = r"""
import json, sys, bson, numpy as np, tensorflow as tf
model_dir, bson_path = sys.argv[1:3]
good = [i["picture"] for i in next(bson.decode_file_iter(open(bson_path, "rb")))["imgs"]][:1]
png = b"\x89PNG\r\n\x1a\n" + b"\0" * 100
serve = tf.saved_model.load(model_dir + "/export").signatures["serving_default"]
def ask(rows):
    images = np.array([r + [b""] * (4 - len(r)) for r in rows], dtype=object)
    mask = np.array([[1.0] * len(r) + [0.0] * (4 - len(r)) for r in rows], np.float32)
    return {k: v.numpy().tolist() for k, v in serve(images=tf.constant(images), mask=tf.constant(mask)).items()}
mixed = ask([[png], good, [good[0], good[0][: len(good[0]) // 2]]])
alone = ask([good])
print(json.dumps({"mixed": mixed, "alone": alone}, default=lambda b: b.decode()))
"""


def test_savedmodel_answers_the_valid_products_of_a_batch_and_names_the_bad_ones(resumed_run):
    result = subprocess.run([sys.executable, "-c", SERVE_BAD, resumed_run["model_dir"],
                             os.path.join(REPO, "data", "train_example.bson")],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    out = json.loads(result.stdout.strip().splitlines()[-1])
    mixed, alone = out["mixed"], out["alone"]
    assert mixed["valid"] == [False, True, False]
    assert mixed["error"] == ["slot 0: not a JPEG (no FF D8 FF start)", "",
                              "slot 1: truncated JPEG (no FF D9 end marker)"]
    assert mixed["category_ids"][0] == [-1] * 5 and mixed["category_ids"][2] == [-1] * 5
    assert mixed["probabilities"][0] == [0.0] * 5
    # The valid product's answer is the one it gets alone: the bad ones took nothing from it.
    assert mixed["category_ids"][1] == alone["category_ids"][0]
    np.testing.assert_allclose(mixed["probabilities"][1], alone["probabilities"][0], rtol=1e-5)


def test_library_mirrored_two_cpu_devices_without_val_split(tmp_path, capsys):
    """training.train called directly, MirroredStrategy over the 2 logical CPUs of conftest.py."""
    import keras

    from model import training

    data = write_data_dir(str(tmp_path / "noval"), with_val=False, one_level1=True)
    config = training.TrainConfig(
        data_dir=data, model_dir=str(tmp_path / "m"), backbone="tiny", image_size=32, batch_size=8,
        epochs=1, steps_per_epoch=2, fusion="late", sample_products=0, cpu_devices=2, precision="mixed_bfloat16",
        bn_recalibration_steps=2,
    )
    try:
        state = training.train(config)
        again = training.train(config)  # a finished run is never started over
    finally:
        keras.config.set_dtype_policy("float32")  # the policy is global: leave it as found
    out = capsys.readouterr().out
    assert "2 replicas on CPU:0..1 (MirroredStrategy)" in out
    assert "No val split" in out and "training without validation" in out
    assert "Epoch 1/1" in out  # Keras alone prints nothing for a single epoch
    assert state["optimizer_iterations"] == 2 and again == state
    assert "already holds a finished run" in out
    # One level1 class: nothing to learn there, so no level1 head (level2 keeps its own).
    assert "No level1 head: labels.csv has one level1 class." in out
    outputs = keras.saving.load_model(tmp_path / "m" / "model.keras").output
    assert set(outputs) == {"category", "level2"}
    assert os.path.exists(tmp_path / "m" / "model.keras") and os.path.exists(tmp_path / "m" / "export")
    assert not os.path.exists(tmp_path / "m" / "best.keras")


@pytest.mark.parametrize("flagfile", ["configs/cpu_tiny.flags", "configs/xception_gpu.flags"])
def test_config_flagfiles_parse(flagfile, data_dir, tmp_path):
    """Every line of the shipped configurations is a valid flag of train.py (parsed in-process)."""
    from absl import flags

    import train

    values = flags.FlagValues()
    for flag in train.FLAGS.get_flags_for_module(train):
        values[flag.name] = flag  # the same Flag objects, in a registry of their own
    values(["train.py", f"--flagfile={os.path.join(REPO, flagfile)}", f"--data_dir={data_dir}",
            f"--model_dir={tmp_path}", "--epochs=2"])
    assert values.epochs == 2  # flags after --flagfile override it
    assert values.batch_size % 8 == 0 if "gpu" in flagfile else values.backbone == "tiny"


def test_submission_from_an_unlabelled_bson_with_bad_products(resumed_run, tmp_path):
    """beam_convert on a test BSON holding bad products, then evaluate.py's submission: a row per _id."""
    import csv

    from beam_convert.__main__ import main as convert
    from model import evaluation
    from tests.convert_helpers import png_bytes, product, write_bson

    docs = sample_documents()[:20]
    documents = [product(d["_id"], [i["picture"] for i in d["imgs"]], category_id=None) for d in docs]
    documents += [
        product(500, [png_bytes()], category_id=None),  # not a JPEG
        product(501, [], category_id=None),  # no images
        {"_id": 502, "imgs": "nope"},  # imgs not a list
        product(docs[0]["_id"], [docs[1]["imgs"][0]["picture"]], category_id=None),  # duplicate _id
    ]
    write_bson(tmp_path / "test.bson", documents)
    test_dir = tmp_path / "test_data"
    assert convert([f"--input={tmp_path / 'test.bson'}", f"--output_dir={test_dir}"]) == 0
    evaluation.evaluate(data_dir=str(test_dir), model_dir=resumed_run["model_dir"], split="test",
                        output_dir=str(tmp_path / "eval"), log=lambda *a, **k: None)
    with open(tmp_path / "eval" / "submission.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["_id", "category_id"]
    ids = [int(r[0]) for r in rows[1:]]
    assert sorted(ids) == sorted({d["_id"] for d in documents})
    known = set(labels_lib.read_labels(os.path.join(resumed_run["model_dir"], record_schema.LABELS_FILE))
                .category_ids.tolist())
    assert all(int(r[1]) in known for r in rows[1:])


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def test_multi_worker_training_keeps_the_workers_in_step(data_dir, tmp_path):
    # Two train.py processes on this host with TF_CONFIG: MultiWorkerMirroredStrategy over gRPC,
    # as across hosts. Synchronous training: both end with the same trainable weights; the chief
    # owns model_dir, the other worker writes under model_dir/workers/.
    import keras

    import model.multi_image  # noqa: F401  (registers the custom layers for load_model)

    cluster = {"worker": [f"localhost:{port}" for port in _free_ports(2)]}
    model_dir = tmp_path / "model"
    workers = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        workers.append(subprocess.Popen(
            [sys.executable, "train.py", f"--data_dir={data_dir}", f"--model_dir={model_dir}", *TINY,
             "--epochs=2", "--steps_per_epoch=3", "--fusion=mean_max"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "TF_CONFIG": tf_config, "TF_CPP_MIN_LOG_LEVEL": "2"}))
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
        assert "2 replicas: 1 here on CPU (MultiWorkerMirroredStrategy)" in output
        assert "Done: 2 epochs, 6 optimizer steps" in output

    chief = keras.saving.load_model(model_dir / "model.keras")
    other = keras.saving.load_model(model_dir / "workers" / "worker_1" / "model.keras")
    assert len(chief.trainable_weights) == len(other.trainable_weights) > 0
    for a, b in zip(chief.trainable_weights, other.trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    assert (model_dir / "export" / "saved_model.pb").exists()


def test_steps_per_execution_keeps_steps_scalars_profile_and_throughput_in_optimizer_steps(data_dir, tmp_path, capsys):
    """steps_per_execution=2 with an epoch of 5 steps: the epoch is rounded to 4 (Keras would run 6),
    step scalars land every 2 optimizer steps, the profile covers optimizer steps 3-5, and
    products/s is a number."""
    from model import training

    model_dir = tmp_path / "m"
    config = training.TrainConfig(
        data_dir=data_dir, model_dir=str(model_dir), backbone="tiny", image_size=32, batch_size=8, epochs=2,
        steps_per_epoch=5, steps_per_execution=2, log_every_steps=2, profile_batches="3,5", sample_products=0,
        bn_recalibration_steps=1, validation_steps=1, fusion="mean")
    state = training.train(config)
    out = capsys.readouterr().out
    assert "steps_per_epoch rounded down from 5 to 4, a multiple of steps_per_execution=2" in out
    assert state["steps_per_epoch"] == 4 and state["optimizer_iterations"] == 8
    assert np.isfinite(state["final"]["products_per_second"]) and state["final"]["products_per_second"] > 0

    points = {}
    for path in glob.glob(str(model_dir / "logs" / "train_steps" / "*tfevents*")):
        for event in tf.compat.v1.train.summary_iterator(path):
            for value in event.summary.value:
                points.setdefault(value.tag, []).append(event.step)
    assert {"step_loss", "step_category_top1", "step_learning_rate", "step_products_per_second"} <= set(points)
    assert points["step_loss"] == [4, 6, 8]  # every 2 steps after the first execution (tracing)

    first, last = (int(s) for s in out.split("Profiled optimizer steps ")[1].split(" ")[0].split("-"))
    assert first <= 3 and last >= 5 and last - first < 6
    assert glob.glob(str(model_dir / "logs" / "train" / "plugins" / "profile" / "*" / "*.xplane.pb"))
