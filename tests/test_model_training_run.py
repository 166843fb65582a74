"""One train.py run, killed, stopped and resumed (the trainer's process campaign), and what it leaves: artefacts, the SavedModel, a submission.

The data is the real sample BSON written as records with record_schema in a plain loop, so these
tests do not depend on the converter. Everything runs the tiny backbone on 32x32 images. A file of
their own because pytest-xdist gives each worker whole files: this one runs beside test_model_training.py.
"""

import concurrent.futures
import glob
import json
import os
import pathlib
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import tensorflow as tf

import record_schema
from model.input_pipeline import labels as labels_lib
from tests.record_helpers import REPO, TINY_TRAIN_FLAGS as TINY, sample_documents, write_data_dir

pytestmark = pytest.mark.slow


def run_killed_and_resumed(data_dir, model_dir, extra_args, stops, trace=None, while_first_runs=None):
    """Runs 3 epochs of 6 steps. For each (signal, condition) in stops, starts the command and
    sends it the signal once backup/progress.json satisfies the condition; then runs the same
    command to the end. SIGKILL is a kill; SIGTERM and SIGINT are asked to stop (exit 128 + n).
    trace: a file where every run logs the batches its training streams make (slow_train.py).
    while_first_runs(args): called once the first run trains (a second trainer on its folder)."""
    args = [sys.executable, "tests/slow_train.py", "0.25" if stops else "0", f"--data_dir={data_dir}",
            f"--model_dir={model_dir}", *TINY, "--epochs=3", "--steps_per_epoch=6", *extra_args]
    env = {**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2", **({"TRACE_BATCHES": trace} if trace else {})}
    progress = os.path.join(model_dir, "backup", "progress.json")
    runs, stopped_at, aside = [], [], None
    for index, (signum, stop_when) in enumerate(stops):
        out_path = os.path.join(os.path.dirname(model_dir), f"run{index}.out")
        with open(out_path, "w") as out:
            run = subprocess.Popen(args, cwd=REPO, stdout=out, stderr=subprocess.PIPE, text=True, env=env)
        deadline, state = time.time() + 180, None
        while time.time() < deadline and run.poll() is None:
            if index == 0 and while_first_runs and aside is None and "Epoch 1/3" in pathlib.Path(out_path).read_text():
                # In a thread: the first run is still polled and stopped on time meanwhile.
                aside = concurrent.futures.ThreadPoolExecutor(1).submit(while_first_runs, args, env)
            state = read_progress(progress)
            if state and stop_when(state):
                run.send_signal(signum)
                break
            time.sleep(0.05)
        err = run.communicate(timeout=60)[1]
        with open(out_path) as f:
            runs.append({"out": f.read(), "err": err, "returncode": run.returncode})
        assert state and stop_when(state), f"no backup to stop after:\n{runs[-1]['out'][-3000:]}{err[-3000:]}"
        stopped_at.append(read_progress(progress))  # a signal's own backup, or the one killed after
        assert run.returncode == (-signum if signum == signal.SIGKILL else 128 + signum), err[-3000:]
        assert not os.path.exists(os.path.join(model_dir, "model.keras"))

    last = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=240, env=env)
    assert last.returncode == 0, last.stderr[-3000:]
    with open(os.path.join(model_dir, "train_state.json")) as f:
        state = json.load(f)
    runs.append({"out": last.stdout, "err": last.stderr, "returncode": 0})
    return {"model_dir": model_dir, "runs": runs, "outputs": [r["out"] for r in runs], "state": state,
            "killed_at": stopped_at, "aside": aside.result(timeout=120) if aside else None}


def read_progress(path):
    try:
        with open(path) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def last_line(stderr: str) -> str:
    lines = [line for line in stderr.splitlines() if line.strip() and not line.startswith(("I0000", "W0000", "WARNING"))]
    return lines[-1] if lines else ""


# Seeded and with deterministic ops, so that the resumed run can be compared with an uninterrupted one.
EXACT = ["--seed=7", "--deterministic"]


def second_trainer(args, env):
    """A second trainer on the first's folder while it trains: what it says, and whether it
    touched anything (the lock is compared without its heartbeat, rewritten every 30 s)."""
    model_dir = next(a for a in args if a.startswith("--model_dir=")).split("=", 1)[1]
    written = {name: os.stat(os.path.join(model_dir, name)).st_mtime_ns
               for name in ("train_config.json", "flags.txt", "labels.csv")}

    def holder():
        with open(os.path.join(model_dir, "run.lock")) as f:
            return {key: value for key, value in json.load(f).items() if key != "heartbeat"}

    held = holder()
    second = subprocess.run(args, cwd=REPO, capture_output=True, text=True, timeout=120, env=env)
    unchanged = ({name: os.stat(os.path.join(model_dir, name)).st_mtime_ns for name in written} == written
                 and holder() == held)
    return {"returncode": second.returncode, "err": second.stderr, "holder": held, "unchanged": unchanged}


@pytest.fixture(scope="module")
def resumed_run(data_dir, tmp_path_factory):
    """The campaign of one run: killed (SIGKILL) right after epoch 1 (at its end-of-epoch backup:
    step 6, not a multiple of the 4-step backups) while a second trainer is refused its folder;
    resumed, stopped by SIGTERM inside epoch 2 (a backup at that step); resumed to the end. One
    replica: tracing for two costs ~20 s more, and the 2-device strategy has its own test. A kill
    inside an epoch, after a step backup, is the two-worker test's (SIGKILL) and the 2-replica
    resume test's (in-process)."""
    folder = tmp_path_factory.mktemp("resumed")
    return run_killed_and_resumed(
        data_dir, str(folder / "model"),
        ["--backup_every_steps=4", "--fusion=mean_max", "--profile_batches=2,3", *EXACT],
        [(signal.SIGKILL, lambda backup: backup["epoch"] == 1 and backup["step_in_epoch"] == 0),
         (signal.SIGTERM, lambda backup: backup["epoch"] == 1 and backup["step_in_epoch"] >= 1)],
        trace=str(folder / "batches.txt"), while_first_runs=second_trainer)


@pytest.fixture(scope="module")
def uninterrupted_run(data_dir, tmp_path_factory):
    """The same command as resumed_run's, never stopped (and exporting with flip TTA, which
    changes nothing else)."""
    folder = tmp_path_factory.mktemp("uninterrupted")
    return run_killed_and_resumed(data_dir, str(folder / "model"),
                                  ["--backup_every_steps=4", "--fusion=mean_max", *EXACT, "--export_flip_tta"], [],
                                  trace=str(folder / "batches.txt"))


def read_trace(path) -> list[tuple[int, int, str]]:
    with open(path) as f:
        return [(int(p), int(b), ids) for p, b, ids in (line.split() for line in f)]


def check_same_stream(resumed, uninterrupted, starts):
    """Every batch the resumed runs' streams made is the uninterrupted run's batch of that index
    (same products, same order); each run's stream began at the step its backup held."""
    made = {(pipeline, batch): ids for pipeline, batch, ids in read_trace(uninterrupted)}
    assert {batch for _, batch in made} >= set(range(18))  # 3 epochs x 6 steps, one replica
    seen = read_trace(resumed)
    trained = [(pipeline, batch, ids) for pipeline, batch, ids in seen if batch < 18]  # streams read ahead
    assert {batch for _, batch, _ in trained} >= set(range(min(starts), 18))
    assert all(made[(pipeline, batch)] == ids for pipeline, batch, ids in trained)
    # A stream is made for each fit call and for the input check: its first batch is the step it starts at.
    firsts = sorted({batch for i, (pipeline, batch, _) in enumerate(seen)
                     if i == 0 or seen[i - 1][1] + 1 != batch or seen[i - 1][0] != pipeline})
    assert set(starts) <= set(firsts) and set(firsts) <= {0, 6, 12, *starts}, firsts


def final_weights(model_dir):
    import keras

    from model.network import multi_image  # noqa: F401  (registers the custom layers)

    return keras.models.load_model(os.path.join(model_dir, "model.keras"), compile=False).get_weights()


def test_a_resumed_run_trains_on_the_batches_and_ends_with_the_weights_of_an_uninterrupted_one(
        resumed_run, uninterrupted_run):
    steps = [kill["optimizer_step"] for kill in resumed_run["killed_at"]]  # 6, then 9..11
    check_same_stream(os.path.join(os.path.dirname(resumed_run["model_dir"]), "batches.txt"),
                      os.path.join(os.path.dirname(uninterrupted_run["model_dir"]), "batches.txt"), steps)
    for resumed, uninterrupted in zip(final_weights(resumed_run["model_dir"]),
                                      final_weights(uninterrupted_run["model_dir"])):
        np.testing.assert_array_equal(resumed, uninterrupted)
    assert resumed_run["state"]["final_val"] == uninterrupted_run["state"]["final_val"]


def test_kill_after_an_epoch_resumes_in_the_next_with_no_step_lost_or_repeated(resumed_run):
    first, second = resumed_run["outputs"][:2]
    assert "Epoch 1/3" in first and resumed_run["killed_at"][0]["optimizer_step"] == 6
    assert f"Resuming from {resumed_run['model_dir']}/backup: epoch 2/3, optimizer step 6" in second
    assert "Epoch 1/3" not in second and "Epoch 2/3" in second


def test_one_trainer_per_model_dir_and_a_dead_holder_does_not_block(resumed_run):
    """The second trainer started while the first trained: one line naming the holder, nothing
    of the first's changed. The first, killed outright, left its lock: the next run took it over."""
    aside, first = resumed_run["aside"], resumed_run["runs"][0]
    assert aside["returncode"] == 1 and "Traceback" not in aside["err"]
    line = last_line(aside["err"])
    assert line.startswith("train.py: error: ")
    assert f"is in use by another trainer (pid {aside['holder']['pid']} on " in line and "started " in line, line
    assert aside["unchanged"]
    assert "is no longer running" in resumed_run["outputs"][1]
    assert not os.path.exists(os.path.join(resumed_run["model_dir"], "run.lock"))


def test_sigterm_stops_at_a_step_with_its_own_backup_in_one_line(resumed_run):
    """The step in flight finishes, a backup at that step (not one of the 4-step backups), one
    line, exit 128 + 15 (asserted as the run ran); the same command resumes from that step."""
    stopped, after = resumed_run["runs"][1], resumed_run["outputs"][2]
    step = resumed_run["killed_at"][1]["optimizer_step"]
    # Asked once the step-8 backup is there: the step in flight then is 9 at the earliest.
    assert 8 < step < 12 and "Traceback" not in stopped["err"]
    assert last_line(stopped["err"]) == (f"train.py: stopped by SIGTERM at optimizer step {step}; the backup in "
                                         f"{resumed_run['model_dir']}/backup holds it. Run the same command to resume.")
    assert f"Resuming from {resumed_run['model_dir']}/backup: epoch 2/3, optimizer step {step}" in after


def test_a_run_stopped_mid_epoch_resumes_there(resumed_run):
    last, state = resumed_run["outputs"][2], resumed_run["state"]
    assert "1 replica on CPU (MirroredStrategy)" in last
    # Resumed inside epoch 2 with the optimizer state of the backup, not from scratch.
    step = resumed_run["killed_at"][1]["optimizer_step"]
    assert 6 < step < 12
    assert "Epoch 1/3" not in last and "Epoch 2/3" in last and "Epoch 3/3" in last
    assert state["epochs"] == 3 and state["resumed_epoch"] == 1 and state["resumed_step"] == step  # epochs done
    # Each resumed epoch runs only its remaining steps: exactly an uninterrupted run's 3 x 6.
    assert state["optimizer_iterations"] == 3 * 6
    assert not os.path.exists(os.path.join(resumed_run["model_dir"], "backup"))


def test_finished_run_with_other_settings_stops_with_one_line(resumed_run, tmp_path):
    """In-process: the check comes before anything is built (train.py's one line and exit 1 for
    such an error are the second trainer's, above)."""
    from absl import flags

    from model import cli, config, errors
    from model.commands import train
    from model.training import loop

    model_path = os.path.join(resumed_run["model_dir"], "model.keras")
    before = os.path.getmtime(model_path)
    other_data = write_data_dir(str(tmp_path / "other"))
    values = flags.FlagValues()  # the command's own flags, in a registry of their own
    train.define_flags(values)
    values(["train.py", f"--data_dir={other_data}", f"--model_dir={resumed_run['model_dir']}", *TINY, "--epochs=3",
            "--steps_per_epoch=6", "--fusion=max"])
    with pytest.raises(errors.UserError) as stopped:
        loop.train(cli.config_from_flags(config.TrainConfig, values))
    line = str(stopped.value)
    assert "\n" not in line and "holds a finished run with other settings" in line
    assert "--fusion=mean_max (now max)" in line and f"(now {other_data})" in line
    assert os.path.getmtime(model_path) == before


def test_artifacts_after_training(resumed_run):
    model_dir = resumed_run["model_dir"]
    # README section 2's list of a finished model_dir.
    for name in ("model.keras", "best.keras", "best.json", "labels.csv", "train_config.json", "train_state.json",
                 "flags.txt", "export/saved_model.pb", "export_best/saved_model.pb", "logs"):
        assert os.path.exists(os.path.join(model_dir, name)), name
    assert not os.path.exists(os.path.join(model_dir, "backup"))
    tags = {}
    for run in ("train", "validation", "samples"):
        for path in glob.glob(os.path.join(model_dir, "logs", run, "*tfevents*")):
            for event in tf.compat.v1.train.summary_iterator(path):
                tags.setdefault(run, set()).update(v.tag for v in event.summary.value)
    assert {"epoch_loss", "epoch_category_top1", "epoch_category_top5", "epoch_learning_rate",
            "epoch_products_per_second"} <= tags["train"]
    assert "epoch_category_top1" in tags["validation"] and tags["samples"] == {"training_products"}
    assert not {"epoch_learning_rate", "epoch_products_per_second"} & tags["validation"]  # as README says
    assert glob.glob(os.path.join(model_dir, "logs", "train", "plugins", "profile", "*", "*.xplane.pb"))
    with open(os.path.join(model_dir, "flags.txt")) as f:
        flags_txt = f.read().splitlines()
    assert "--fusion=mean_max" in flags_txt and "--epochs=3" in flags_txt and "--batch_size=8" in flags_txt


SERVE = r"""
import json, sys, bson, numpy as np, tensorflow as tf
model_dir, bson_path = sys.argv[1:3]
docs = list(bson.decode_file_iter(open(bson_path, "rb")))[:6]
serve = tf.saved_model.load(model_dir + "/export").signatures["serving_default"]
def ask(rows):
    images = np.array([r + [b""] * (4 - len(r)) for r in rows], dtype=object)
    mask = np.array([[1.0] * len(r) + [0.0] * (4 - len(r)) for r in rows], np.float32)
    return {k: v.numpy().tolist() for k, v in serve(images=tf.constant(images), mask=tf.constant(mask)).items()}
products = ask([[i["picture"] for i in d["imgs"]][:4] for d in docs])
good = [i["picture"] for i in docs[0]["imgs"]][:1]
png = b"\x89PNG\r\n\x1a\n" + b"\0" * 100
mixed = ask([[png], good, [good[0], good[0][: len(good[0]) // 2]]])
alone = ask([good])
print(json.dumps({"products": products, "mixed": mixed, "alone": alone}, default=lambda b: b.decode()))
"""


@pytest.fixture(scope="module")
def served(resumed_run):
    """The export's answers in a fresh process (no Python of this repo imported): 6 real products;
    a batch of a PNG, a good product and one with a cut JPEG; and the good product alone."""
    result = subprocess.run([sys.executable, "-c", SERVE, resumed_run["model_dir"],
                             os.path.join(REPO, "data", "train_example.bson")],
                            cwd=REPO, capture_output=True, text=True, timeout=120,
                            env={**os.environ, "TF_CPP_MIN_LOG_LEVEL": "2"})
    assert result.returncode == 0, result.stderr[-3000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def test_savedmodel_serves_jpeg_bytes_in_fresh_process(resumed_run, served):
    out = served["products"]
    known = set(labels_lib.read_labels(os.path.join(resumed_run["model_dir"], "labels.csv")).category_ids.tolist())
    assert len(out["category_ids"]) == 6 and all(len(row) == 5 for row in out["category_ids"])
    assert all(c in known for row in out["category_ids"] for c in row)
    for row in out["probabilities"]:
        assert row == sorted(row, reverse=True) and 0 < sum(row) <= 1.0001
    assert out["valid"] == [True] * 6 and out["error"] == [""] * 6


def test_savedmodel_answers_the_valid_products_of_a_batch_and_names_the_bad_ones(served):
    mixed, alone = served["mixed"], served["alone"]
    assert mixed["valid"] == [False, True, False]
    assert mixed["error"] == ["slot 0: not a JPEG (no FF D8 FF start)", "",
                              "slot 1: truncated JPEG (no FF D9 end marker)"]
    assert mixed["category_ids"][0] == [-1] * 5 and mixed["category_ids"][2] == [-1] * 5
    assert mixed["probabilities"][0] == [0.0] * 5
    # The valid product's answer is the one it gets alone: the bad ones took nothing from it.
    assert mixed["category_ids"][1] == alone["category_ids"][0]
    np.testing.assert_allclose(mixed["probabilities"][1], alone["probabilities"][0], rtol=1e-5)


def test_predict_answers_with_what_train_py_exported(resumed_run, tmp_path):
    """model.predict's command on train.py's model_dir, in-process (the command as a user types it
    runs in tests/test_model_predict.py): export/ asked; the answer is model.keras's on the
    evaluation decoding."""
    import io

    from model.commands import predict
    from model.evaluation.predict import load_model
    from model.input_pipeline import decode
    from model.model_dir import RunFolder

    model_dir, pictures = resumed_run["model_dir"], [i["picture"] for i in sample_documents()[12]["imgs"]]
    files = [str(tmp_path / f"p{j}.jpg") for j in range(len(pictures))]
    for name, picture in zip(files, pictures):
        with open(name, "wb") as f:
            f.write(picture)
    out = io.StringIO()
    assert predict.run(model_dir, [",".join(files)], as_json=True, out=out) == 0
    (answer,) = [json.loads(line) for line in out.getvalue().splitlines()]

    model, _ = load_model(model_dir)
    labels = labels_lib.read_labels(RunFolder(model_dir).labels_file)
    mask = tf.constant([[1.0] * len(pictures) + [0.0] * (4 - len(pictures))])
    images = tf.constant([pictures + [b""] * (4 - len(pictures))])
    logits = model({"images": decode.decode_images(images, mask, 32), "mask": mask}, training=False)
    probabilities = tf.nn.softmax(logits["category"]).numpy()[0]
    # Each answered category with the model's probability for it, and those are its 5 highest (a
    # model trained 18 steps may have near-ties, whose order float round-off can swap).
    class_of = labels.class_of_category()
    answered = [(class_of[row["category_id"]], row["probability"]) for row in answer["top"]]
    np.testing.assert_allclose([p for _, p in answered], [probabilities[c] for c, _ in answered], rtol=1e-5)
    np.testing.assert_allclose([p for _, p in answered], np.sort(probabilities)[::-1][:5], rtol=1e-5)


def test_submission_from_an_unlabelled_bson_with_bad_products(resumed_run, tmp_path):
    """beam_convert on a test BSON holding bad products, then evaluate.py's submission: a row per _id."""
    import csv

    from beam_convert.__main__ import main as convert
    from model.config import EvalConfig
    from model.evaluation import evaluate as evaluation
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
    evaluation.evaluate(EvalConfig(data_dir=str(test_dir), model_dir=resumed_run["model_dir"], split="test",
                                   output_dir=str(tmp_path / "eval")), log=lambda *a, **k: None)
    with open(tmp_path / "eval" / "submission.csv", newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["_id", "category_id"]
    ids = [int(r[0]) for r in rows[1:]]
    assert sorted(ids) == sorted({d["_id"] for d in documents})
    # docs/FORMATS.md: the converted products first, in the shards' record order.
    converted = np.load(test_dir / record_schema.product_ids_name("test")).tolist()
    assert ids[:len(converted)] == converted
    known = set(labels_lib.read_labels(os.path.join(resumed_run["model_dir"], record_schema.LABELS_FILE))
                .category_ids.tolist())
    assert all(int(r[1]) in known for r in rows[1:])


def test_the_best_epoch_is_recalibrated_measured_and_exported_as_asked(uninterrupted_run, data_dir):
    """best.keras after training is the model train_state.json's best_val measures (recalibrated,
    not the epoch's raw model); both exports carry --export_flip_tta."""
    import keras

    from model.network import multi_image  # noqa: F401  (registers the custom layers)
    from model.training import inputs
    from model.training import optimization
    from model.config import config_from_json
    from model.input_pipeline import labels as labels_lib

    model_dir, state = uninterrupted_run["model_dir"], uninterrupted_run["state"]
    assert 1 <= state["best_epoch"] <= 3 and state["best_val"]
    with open(os.path.join(model_dir, "train_config.json")) as f:
        cfg = config_from_json(json.load(f)["train"])
    labels = labels_lib.read_labels(model_dir)
    heads = inputs.auxiliary_heads(labels, cfg.aux_loss_weight)
    best = keras.models.load_model(os.path.join(model_dir, "best.keras"), compile=False)
    optimization.compile_model(best, cfg, keras.optimizers.SGD(), heads)
    measured = best.evaluate(inputs.eval_dataset(cfg, "val", inputs.make_targets(labels, heads)), return_dict=True,
                             verbose=0)
    assert measured["category_top1"] == pytest.approx(state["best_val"]["category_top1"], abs=1e-6)
    for export in ("export", "export_best"):
        info = tf.saved_model.load(os.path.join(model_dir, export)).signatures["serving_info"]()
        assert bool(info["flip_tta"].numpy()), export


def test_the_replicas_line_is_the_third(uninterrupted_run):
    """README section 0 and docs/FORMATS.md section 4 point users to it by its place."""
    lines = uninterrupted_run["outputs"][0].splitlines()
    assert lines[0].startswith("Seed ") and lines[1].startswith("Settings other than the defaults: "), lines[:3]
    assert lines[2].startswith("1 replica on CPU (MirroredStrategy); "), lines[:3]
