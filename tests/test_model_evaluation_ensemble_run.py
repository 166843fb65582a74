"""evaluate() with ensembles, checkpoints, top_k.npz and the image-level duplicate lookup, on two
tiny models trained once in-process on tests/record_helpers.py's data folder (different image
sizes and fusions, as an ensemble's members may have)."""

import json
import os
import pathlib
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

import record_schema
from model import config, errors
from model import model_dir as model_dir_lib
from model.evaluation import evaluate as evaluation
from model.evaluation import top_k_file
from model.training import loop
from tests.record_helpers import REPO, sample_documents, write_data_dir

pytestmark = pytest.mark.slow
REPO_PATH = pathlib.Path(REPO)

TINY = dict(backbone="tiny", batch_size=8, sample_products=0, bn_recalibration_steps=1, warmup_epochs=0.5,
            input_check=False, epochs=1, steps_per_epoch=3)


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp("ensemble")
    data = write_data_dir(str(root / "data"))
    models = {}
    for name, image_size, fusion in (("a", 32, "mean"), ("b", 40, "mean_max")):
        models[name] = str(root / name)
        loop.train(config.TrainConfig(data_dir=data, model_dir=models[name], image_size=image_size, fusion=fusion,
                                      **TINY))
    return {"data": data, **models}


def evaluate(trained, model_dir, output_dir, **options):
    return evaluation.evaluate(config.EvalConfig(data_dir=trained["data"], model_dir=model_dir, split="val",
                                          output_dir=str(output_dir), batch_size=8, **options), log=lambda *_: None)


def top1_of(arrays) -> float:
    return float((arrays["class_index"][:, 0] == arrays["label"]).mean())


def test_ensemble_is_the_average_of_its_members_files(trained, tmp_path):
    """The ensemble, combined batch by batch with each member decoding at its own size, equals
    averaging the members' own top_k.npz (every class kept) offline; its members' figures are
    their own evaluations'."""
    classes = len(open(os.path.join(trained["data"], record_schema.LABELS_FILE)).readlines()) - 1
    alone = {}
    for name in ("a", "b"):
        alone[name] = evaluate(trained, trained[name], tmp_path / name, save_top_k=classes)
    both = evaluate(trained, f"{trained['a']},{trained['b']}", tmp_path / "ab", save_top_k=classes,
                    ensemble_weights="3,1")
    files = {n: top_k_file.read_top_k(str(tmp_path / n / top_k_file.FILE)) for n in ("a", "b", "ab")}
    assert files["a"]["probability"].shape == (17, classes)
    dense = {}
    for name in ("a", "b"):
        p = np.zeros([17, classes], np.float32)
        np.put_along_axis(p, files[name]["class_index"], files[name]["probability"], axis=1)
        dense[name] = p
    offline = 0.75 * dense["a"] + 0.25 * dense["b"]
    ab = files["ab"]
    np.testing.assert_array_equal(ab["product_id"], files["a"]["product_id"])
    np.testing.assert_allclose(np.take_along_axis(offline, ab["class_index"], axis=1), ab["probability"], atol=1e-6)
    assert both["top1"] == pytest.approx(top1_of(ab))
    assert both["model_dir"] == f"{trained['a']},{trained['b']}"
    assert both["ensemble"] == {"mean": "arithmetic", "weights": [0.75, 0.25]}
    assert [(m["model_dir"], m["image_size"], m["fusion"]) for m in both["members"]] == [
        (trained["a"], 32, "mean"), (trained["b"], 40, "mean_max")]
    for member, name in zip(both["members"], ("a", "b")):
        assert member["top1"] == pytest.approx(alone[name]["top1"])
        assert member["top5"] == pytest.approx(alone[name]["top5"])
        assert alone[name]["members"][0]["top1"] == alone[name]["top1"]
    saved = json.loads((tmp_path / "ab" / model_dir_lib.METRICS_FILE).read_text())
    assert saved["top1"] == both["top1"] and len(saved["members"]) == 2
    # docs/FORMATS.md's row for `members` names exactly the keys each entry has on a labelled split.
    formats = (REPO_PATH / "docs" / "FORMATS.md").read_text(encoding="utf-8")
    row = next(line for line in formats.splitlines() if line.startswith("| `members` |"))
    assert set(re.findall(r'"(\w+)"', row)) == set(saved["members"][0])


def test_the_same_model_twice_scores_as_the_model(trained, tmp_path):
    """The geometric mean of a model with itself is the model (the arithmetic one is checked above)."""
    alone = evaluate(trained, trained["a"], tmp_path / "a")
    copy = str(tmp_path / "a_copy")  # one folder listed twice is refused (issue 28, item 8); its copy is not
    shutil.copytree(trained["a"], copy)
    twice = evaluate(trained, [trained["a"], copy], tmp_path / "twice", ensemble_mean="geometric")
    assert (twice["top1"], twice["top5"]) == pytest.approx((alone["top1"], alone["top5"]))
    assert [m["top1"] for m in twice["members"]] == [alone["top1"]] * 2


def test_a_save_top_k_above_the_class_count_is_said(trained, tmp_path):
    """Issue 28, item 10: said in one line, not clipped without a word."""
    lines = []
    evaluation.evaluate(config.EvalConfig(data_dir=trained["data"], model_dir=trained["a"], split="val",
                                          output_dir=str(tmp_path / "out"), save_top_k=99), log=lines.append)
    classes = len(open(os.path.join(trained["data"], record_schema.LABELS_FILE)).readlines()) - 1
    assert f"--save_top_k=99 is more than the model's {classes} classes: top_k.npz keeps all {classes} a product" in lines
    assert top_k_file.read_top_k(str(tmp_path / "out" / top_k_file.FILE))["probability"].shape == (17, classes)


def test_a_run_still_being_trained_is_said(trained, tmp_path):
    """Issue 28, item 10: a member whose run.lock a live trainer holds is named in one line (read
    only: the lock stays the trainer's), or stops with one when its model is not written yet."""
    from model.training import run_lock

    running = tmp_path / "running"
    shutil.copytree(trained["a"], running)
    lines = []
    with run_lock.hold(str(running), log=lambda *_, **__: None):
        lock = (running / model_dir_lib.LOCK_FILE).read_text()
        evaluation.evaluate(config.EvalConfig(data_dir=trained["data"], model_dir=str(running), split="val",
                                              output_dir=str(tmp_path / "out")),
                            log=lines.append, trainer_of=run_lock.trainer_of)
        assert (running / model_dir_lib.LOCK_FILE).read_text() == lock
        os.remove(running / model_dir_lib.MODEL_FILE)
        with pytest.raises(errors.UserError, match=rf"^{running} is still being trained \(pid {os.getpid()} on .*\): "
                                                   r"model.keras is not written yet; wait for the run to finish; "
                                                   r"evaluate the best epoch so far with --checkpoint=best$"):
            evaluation.evaluate(config.EvalConfig(data_dir=trained["data"], model_dir=str(running), split="val"),
                                trainer_of=run_lock.trainer_of)
    assert f"{running} is still being trained (pid {os.getpid()} on " in lines[0]
    assert lines[0].endswith("): evaluating its model.keras as it is now")
    assert run_lock.trainer_of(str(running)) is None  # released


def test_members_with_other_classes_fail_naming_both(trained, tmp_path):
    other = tmp_path / "other"
    shutil.copytree(trained["b"], other)
    labels = other / record_schema.LABELS_FILE
    lines = labels.read_text().splitlines()
    lines[1] = lines[1].replace(lines[1].split(",")[1], "999", 1)  # class 0 is another category there
    labels.write_text("\n".join(lines) + "\n")
    with pytest.raises(errors.UserError, match=f"^{trained['a']}/labels.csv and {other}/labels.csv differ"):
        evaluate(trained, f"{trained['a']},{other}", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_weights_count_must_match(trained, tmp_path):
    with pytest.raises(errors.UserError, match="--ensemble_weights has 3 weights for 2 models"):
        evaluate(trained, f"{trained['a']},{trained['b']}", tmp_path / "out", ensemble_weights="1,1,1")


def test_best_checkpoint_is_read_and_its_absence_named(trained, tmp_path):
    assert os.path.exists(os.path.join(trained["a"], model_dir_lib.BEST_FILE))  # trained with val
    best = evaluate(trained, trained["a"], tmp_path / "best", checkpoint="best")
    assert best["checkpoint"] == "best" and best["members"][0]["checkpoint"] == "best"
    assert evaluation.default_output_dir([trained["a"]], ["best"], "val").endswith("eval_val_best")
    without = tmp_path / "without_val"
    shutil.copytree(trained["a"], without)
    os.remove(without / model_dir_lib.BEST_FILE)
    with pytest.raises(errors.UserError, match=f"^{without}/best.keras is absent: --checkpoint=best needs a run "
                                               "trained with a val split"):
        evaluate(trained, str(without), tmp_path / "out", checkpoint="best")
    final = evaluate(trained, str(without), tmp_path / "final")  # final still works
    assert final["checkpoint"] == "final"


def test_image_level_lookup_uses_the_other_pictures(trained, tmp_path):
    """The first picture of every val product is made a training picture: under its own category
    for val products 5, 15, ..., 75, under another one for 0, 10, ..., 80. The product level
    answers with that category; the image level too when it is the product's only picture, else it
    fuses it with the model's prediction from the other pictures. Both levels are measured."""
    docs = sample_documents()
    category_ids = sorted({d["category_id"] for d in docs})
    wrong = {c: category_ids[(i + 1) % len(category_ids)] for i, c in enumerate(category_ids)}
    val = [(i, d) for i, d in enumerate(docs) if i % 5 == 0]  # write_data_dir's val split
    train_data = tmp_path / "train_digests"
    train_data.mkdir()
    np.savez(train_data / record_schema.IMAGE_DIGESTS_FILE,
             digest=np.array([record_schema.image_digest(d["imgs"][0]["picture"]) for _, d in val], np.int64),
             category_id=np.array([wrong[d["category_id"]] if i % 10 == 0 else d["category_id"] for i, d in val],
                                  np.int64),
             count=np.ones(len(val), np.int64))
    summary = {level: evaluate(trained, trained["a"], tmp_path / level, dup_lookup=True, dup_lookup_level=level,
                               train_data_dir=str(train_data), save_top_k=3) for level in ("image", "product")}
    image, product = summary["image"]["dup_lookup"], summary["product"]["dup_lookup"]
    assert image["level"] == "image" and product["level"] == "product"
    assert image["image_level"] == product["image_level"] and image["product_level"] == product["product_level"]
    assert summary["image"]["top1"] == image["image_level"]["top1"]
    assert summary["product"]["top1"] == product["product_level"]["top1"]
    assert image["image_level"]["matched"] == image["product_level"]["overridden"] == len(val) == 17

    right = [d for i, d in val if i % 10 == 5]
    singles = [(i, d) for i, d in val if len(d["imgs"]) == 1]
    right_singles = sum(i % 10 == 5 for i, _ in singles)
    assert image["product_level"]["top1"] == pytest.approx(len(right) / 17)
    # One picture: the lookup alone answers, at both levels.
    for level in ("image", "product"):
        assert summary[level]["by_image_count"]["1"]["top1"] == pytest.approx(right_singles / len(singles))
    # Several pictures: the model's prediction from the others decides with the match, so anything
    # from none to all of them right.
    assert right_singles / 17 <= image["image_level"]["top1"] <= (right_singles + 17 - len(singles)) / 17
    # top_k.npz holds the model's own probabilities, the same whatever the lookup.
    files = [top_k_file.read_top_k(str(tmp_path / level / top_k_file.FILE)) for level in ("image", "product")]
    np.testing.assert_array_equal(files[0]["class_index"], files[1]["class_index"])
    assert top1_of(files[0]) == pytest.approx(image["top1_without"])


def test_command_line_ensemble(trained, tmp_path):
    out = tmp_path / "out"
    run = subprocess.run([sys.executable, "evaluate.py", f"--data_dir={trained['data']}",
                          f"--model_dir={trained['a']},{trained['b']}", "--split=val", f"--output_dir={out}",
                          "--ensemble_mean=geometric", "--checkpoint=final,best", "--save_top_k=2"],
                         cwd=REPO, capture_output=True, text=True)
    assert run.returncode == 0, run.stderr[-2000:]
    metrics = json.loads((out / model_dir_lib.METRICS_FILE).read_text())
    assert metrics["ensemble"]["mean"] == "geometric" and metrics["checkpoint"] == "final,best"
    assert top_k_file.read_top_k(str(out / top_k_file.FILE))["probability"].shape == (17, 2)
    # A member without a model stops evaluate.py's flags, before anything runs (absl's exit 1 with
    # its FATAL line, as for any bad flag: tests/test_model_training.py shows it for train.py).
    from absl import flags

    from model.commands import evaluate as evaluate_command

    values = flags.FlagValues()  # evaluate.py's flags and checks, in a registry of their own
    evaluate_command.define_flags(values)
    with pytest.raises(flags.IllegalFlagValueError, match=re.escape(f"--model_dir {tmp_path / 'nothing'} has no model.keras")):
        values(["evaluate.py", f"--data_dir={trained['data']}", f"--model_dir={trained['a']},{tmp_path / 'nothing'}"])
