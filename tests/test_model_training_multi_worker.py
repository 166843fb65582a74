"""Two train.py workers under MultiWorkerMirroredStrategy on this host (gRPC, as across hosts):
in step, and killed and resumed as an uninterrupted pair. A file of its own: pytest-xdist gives
each worker whole files, and this one holds three two-process runs.

Sized for the checks only: a data folder without val (no validation, best.keras nor second
export), no sample grid, 2 epochs of 2 steps, and the kill held at its step (slow_train.py's
HOLD_AFTER_STEP) instead of slowed steps and a race against them."""

import json
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

from tests.launchers import free_ports
from tests.record_helpers import REPO, TINY_TRAIN_FLAGS, write_data_dir

pytestmark = pytest.mark.slow

EPOCHS, STEPS_PER_EPOCH = 2, 2
STEPS = EPOCHS * STEPS_PER_EPOCH
KILLED_AT = STEPS_PER_EPOCH + 1  # inside epoch 2: one step of it done, one left
FLAGS = [*(flag for flag in TINY_TRAIN_FLAGS if not flag.startswith("--sample_products=")), "--sample_products=0",
         f"--epochs={EPOCHS}", f"--steps_per_epoch={STEPS_PER_EPOCH}", "--fusion=mean_max", "--seed=5",
         "--deterministic", "--backup_every_steps=1"]


def _start_workers(data_dir, model_dir, trace_dir, hold_after_step=0):
    """Two train.py processes on this host with TF_CONFIG (tests/slow_train.py, each tracing its
    batches, held after optimizer step hold_after_step if given): MultiWorkerMirroredStrategy over
    gRPC, as across hosts. They import this worktree's code (slow_train.py puts REPO first)."""
    cluster = {"worker": [f"localhost:{port}" for port in free_ports(2)]}
    workers = []
    for index in range(2):
        tf_config = json.dumps({"cluster": cluster, "task": {"type": "worker", "index": index}})
        workers.append(subprocess.Popen(
            [sys.executable, "tests/slow_train.py", "0", f"--data_dir={data_dir}", f"--model_dir={model_dir}", *FLAGS],
            cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
            env={**os.environ, "TF_CONFIG": tf_config, "TF_CPP_MIN_LOG_LEVEL": "2", "PYTHONPATH": REPO,
                 "HOLD_AFTER_STEP": str(hold_after_step), "HOLD_FILE": os.path.join(trace_dir, f"holding_{index}"),
                 "TRACE_BATCHES": os.path.join(trace_dir, f"worker_{index}.txt")}))
    return workers


def _finish(workers):
    outputs = [worker.communicate(timeout=300)[0] for worker in workers]
    for worker, output in zip(workers, outputs):
        assert worker.returncode == 0, output[-3000:]
        assert "2 replicas: 1 here on CPU (MultiWorkerMirroredStrategy)" in output
        assert f"Done: {EPOCHS} epochs, {STEPS} optimizer steps" in output
    return outputs


def _backup_step(model_dir):
    try:
        return json.loads((model_dir / "backup" / "progress.json").read_text())["optimizer_step"]
    except (OSError, ValueError, KeyError):
        return None


def _trace(trace_dir):
    """{(worker, batch): product ids} of the batches the workers' streams made."""
    made = {}
    for index in range(2):
        with open(os.path.join(trace_dir, f"worker_{index}.txt")) as f:
            for line in f:
                pipeline, batch, ids = line.split()
                assert int(pipeline) == index  # each worker's stream is its own input pipeline
                made.setdefault((index, int(batch)), set()).add(ids)
    return made


def _products(made, index):
    return {int(i) for (worker, _), batches in made.items() if worker == index for ids in batches
            for i in ids.split(",")}


def test_two_workers_keep_in_step_and_resume_as_an_uninterrupted_run(tmp_path):
    """Synchronous training: both workers end with the same weights; the chief owns model_dir,
    the other writes under model_dir/workers/; each worker reads its own share. Killed inside
    epoch 2 (SIGKILL, both) and resumed, each worker trains on its uninterrupted twin's batches
    and the chief ends bit-identical."""
    import keras

    import model.network.multi_image  # noqa: F401  (registers the custom layers for load_model)

    data_dir = write_data_dir(str(tmp_path / "data"), with_val=False)
    traces = {name: tmp_path / name for name in ("uninterrupted", "killed", "resumed")}
    for folder in traces.values():
        folder.mkdir()
    model_dir = tmp_path / "uninterrupted" / "model"
    _finish(_start_workers(data_dir, model_dir, traces["uninterrupted"]))
    chief = keras.saving.load_model(model_dir / "model.keras")
    other = keras.saving.load_model(model_dir / "workers" / "worker_1" / "model.keras")
    assert len(chief.trainable_weights) == len(other.trainable_weights) > 0
    for a, b in zip(chief.trainable_weights, other.trainable_weights):
        np.testing.assert_allclose(a.numpy(), b.numpy(), rtol=1e-5, atol=1e-6, err_msg=a.path)
    assert (model_dir / "export" / "saved_model.pb").exists()
    made = _trace(traces["uninterrupted"])
    assert not _products(made, 0) & _products(made, 1)  # each worker reads its own share

    # Killed once both hold after step KILLED_AT (each has written its backup of that step
    # first), whatever the load: no race against slowed steps, nor against a backup written a
    # moment before its worker holds.
    uninterrupted, model_dir = model_dir, tmp_path / "resumed" / "model"
    workers = _start_workers(data_dir, model_dir, traces["killed"], hold_after_step=KILLED_AT)
    deadline = time.time() + 240
    holding = [traces["killed"] / f"holding_{index}" for index in range(2)]
    while time.time() < deadline and all(worker.poll() is None for worker in workers) and not all(
            path.exists() for path in holding):
        time.sleep(0.05)
    for worker in workers:
        worker.kill()
    outputs = [worker.communicate(timeout=30)[0] for worker in workers]
    assert [worker.returncode for worker in workers] == [-signal.SIGKILL] * 2, outputs[0][-3000:]
    for output in outputs:
        assert f"Holding after optimizer step {KILLED_AT}" in output, output[-3000:]
    step = _backup_step(model_dir)
    assert step == _backup_step(model_dir / "workers" / "worker_1") == KILLED_AT, outputs[0][-3000:]
    assert STEPS_PER_EPOCH < step < STEPS  # inside epoch 2
    assert not (model_dir / "model.keras").exists()
    for output in _finish(_start_workers(data_dir, model_dir, traces["resumed"])):
        assert f"Resuming from {model_dir}/backup: epoch 2/2, optimizer step {step}" in output

    # The steps each run trained (its streams read ahead: more batches made): the killed run's
    # first, the resumed run's from the step it resumed at, each the uninterrupted twin's batch.
    killed, resumed = _trace(traces["killed"]), _trace(traces["resumed"])
    for index in range(2):
        assert min(batch for worker, batch in resumed if worker == index) == step  # the stream starts there
    trained = {**{key: ids for key, ids in killed.items() if key[1] < step},
               **{key: ids for key, ids in resumed.items() if key[1] < STEPS}}
    assert sorted(trained) == [(index, batch) for index in range(2) for batch in range(STEPS)]
    for key, ids in trained.items():
        assert ids == made[key] and len(ids) == 1, key
    for a, b in zip(keras.saving.load_model(uninterrupted / "model.keras").get_weights(),
                    keras.saving.load_model(model_dir / "model.keras").get_weights()):
        np.testing.assert_array_equal(a, b)
