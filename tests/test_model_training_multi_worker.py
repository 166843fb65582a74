"""Two train.py workers under MultiWorkerMirroredStrategy on this host (gRPC, as across hosts):
in step, and killed and resumed as an uninterrupted pair. A file of its own: pytest-xdist gives
each worker whole files, and this one holds three two-process runs."""

import json
import os
import socket
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.record_helpers import REPO, TINY_TRAIN_FLAGS as TINY

pytestmark = pytest.mark.slow


def _free_ports(n):
    sockets = [socket.socket() for _ in range(n)]
    for s in sockets:
        s.bind(("localhost", 0))
    ports = [s.getsockname()[1] for s in sockets]
    for s in sockets:
        s.close()
    return ports


def _start_workers(data_dir, model_dir, trace_dir, seconds_per_step):
    """Two train.py processes on this host with TF_CONFIG (tests/slow_train.py, each tracing its
    batches): MultiWorkerMirroredStrategy over gRPC, as across hosts."""
    cluster = {"worker": [f"localhost:{port}" for port in _free_ports(2)]}
    workers = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        workers.append(subprocess.Popen(
            [sys.executable, "tests/slow_train.py", str(seconds_per_step), f"--data_dir={data_dir}",
             f"--model_dir={model_dir}", *TINY, "--epochs=2", "--steps_per_epoch=3", "--fusion=mean_max",
             "--seed=5", "--deterministic", "--backup_every_steps=1"],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "TF_CONFIG": tf_config, "TF_CPP_MIN_LOG_LEVEL": "2",
                 "TRACE_BATCHES": os.path.join(trace_dir, f"worker_{index}.txt")}))
    return workers


def _finish(workers):
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
        assert "2 replicas: 1 here on CPU (MultiWorkerMirroredStrategy)" in output
    return outputs


def _trace(trace_dir):
    """{(worker, batch): product ids} of the batches the workers' streams made."""
    made = {}
    for index in range(2):
        with open(os.path.join(trace_dir, f"worker_{index}.txt")) as f:
            for line in f:
                pipeline, batch, ids = line.split()
                assert int(pipeline) == index  # each worker reads its own share
                made.setdefault((index, int(batch)), set()).add(ids)
    return made


def test_two_workers_keep_in_step_and_resume_as_an_uninterrupted_run(data_dir, tmp_path):
    """Synchronous training: both workers end with the same weights; the chief owns model_dir,
    the other writes under model_dir/workers/. Killed inside epoch 2 (SIGKILL, both) and resumed,
    each worker trains on its uninterrupted twin's batches and the chief ends bit-identical."""
    import keras

    import model.network.multi_image  # noqa: F401  (registers the custom layers for load_model)

    runs = {}
    for name in ("uninterrupted", "resumed"):
        (tmp_path / name).mkdir()
        runs[name] = (tmp_path / name / "model", str(tmp_path / name))
    model_dir, trace_dir = runs["uninterrupted"]
    for output in _finish(_start_workers(data_dir, model_dir, trace_dir, 0)):
        assert "Done: 2 epochs, 6 optimizer steps" in output
    chief = keras.saving.load_model(model_dir / "model.keras")
    other = keras.saving.load_model(model_dir / "workers" / "worker_1" / "model.keras")
    assert len(chief.trainable_weights) == len(other.trainable_weights) > 0
    for a, b in zip(chief.trainable_weights, other.trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    assert (model_dir / "export" / "saved_model.pb").exists()

    model_dir, trace_dir = runs["resumed"]
    workers = _start_workers(data_dir, model_dir, trace_dir, 0.3)
    progress = model_dir / "backup" / "progress.json"
    deadline = time.time() + 240
    while time.time() < deadline and not (progress.exists() and json.loads(progress.read_text() or "{}").get(
            "optimizer_step", 0) >= 4):
        time.sleep(0.05)
    for worker in workers:
        worker.kill()
        worker.communicate(timeout=30)
    step = json.loads(progress.read_text())["optimizer_step"]
    assert 4 <= step < 6, step  # inside epoch 2
    for output in _finish(_start_workers(data_dir, model_dir, trace_dir, 0)):
        assert f"Resuming from {model_dir}/backup: epoch 2/2, optimizer step {step}" in output

    made, seen = _trace(runs["uninterrupted"][1]), _trace(trace_dir)
    trained = {key: ids for key, ids in seen.items() if key[1] < 6}  # 6 steps, one batch each (read ahead: more)
    assert {batch for _, batch in trained} == set(range(6))
    assert all(ids == made[key] and len(ids) == 1 for key, ids in trained.items())
    for a, b in zip(keras.saving.load_model(runs["uninterrupted"][0] / "model.keras").get_weights(),
                    keras.saving.load_model(model_dir / "model.keras").get_weights()):
        np.testing.assert_array_equal(a, b)
