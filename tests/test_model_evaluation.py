"""Evaluation library: metrics on a hand-computed case, the submission file, the duplicate lookup."""

import csv
import json

import numpy as np
import pytest

import record_schema
from beam_convert import categories as categories_lib
import demo
from model.evaluation import duplicates, metrics, report, submission
from model.input_pipeline import data_folder
from model.input_pipeline import labels as labels_lib

# Four classes under two level1 nodes; classes 2 and 3 share level1 "B" and level2 "x".
TREE = {
    11: ("A", "p", "leaf11"),
    22: ("A", "q", "leaf22"),
    33: ("B", "x", "leaf33"),
    44: ("B", "x", "leaf44, with a comma"),
}


@pytest.fixture
def labels(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text(categories_lib.labels_csv([categories_lib.Category(c, *TREE[c]) for c in sorted(TREE)]),
                    encoding="utf-8")
    return labels_lib.read_labels(str(path))


def test_labels_csv_quoted_fields_and_tree(labels, tmp_path):
    assert labels.category_ids.tolist() == [11, 22, 33, 44]
    assert labels.level3[3] == "leaf44, with a comma"
    assert labels.level1_index.tolist() == [0, 0, 1, 1]
    assert labels.level2_index.tolist() == [0, 1, 2, 2]
    assert labels.has_hierarchy
    # The real file: quoted fields with commas and doubled quotes survive the round trip.
    with open("data/category_names.csv", encoding="utf-8") as f:
        real = categories_lib.read_categories(f.read(), "category_names.csv")
    (tmp_path / "real.csv").write_text(categories_lib.labels_csv(real), encoding="utf-8")
    back = labels_lib.read_labels(str(tmp_path / "real.csv"))
    assert [c.level3 for c in real] == list(back.level3)
    assert any('""' in c.level3 or "," in c.level3 for c in real)


def test_metrics_hand_computed(labels):
    # true, top-5 (only 4 classes: top-k rows are 4 long), images
    true = [0, 1, 2, 3, 3, 2]
    top = [
        [0, 1, 2, 3],  # top-1 hit
        [0, 1, 2, 3],  # top-1 miss (0: same level1 A, other level2), top-5 hit
        [3, 2, 0, 1],  # miss, predicted 3: same level1 and level2 as 2
        [3, 0, 1, 2],  # hit
        [2, 3, 0, 1],  # miss, same level2
        [1, 0, 3, 2],  # miss, other level1
    ]
    images = [1, 1, 2, 2, 4, 4]
    m = metrics.compute_metrics(true, top, images, labels, train_class_counts=[5, 50, 500, 5000])
    assert m["products"] == 6
    assert m["top1"] == pytest.approx(2 / 6)
    assert m["top5"] == pytest.approx(1.0)
    assert m["by_image_count"]["1"] == {"products": 2, "top1": 0.5, "top5": 1.0}
    assert m["by_image_count"]["2"]["top1"] == pytest.approx(0.5)
    assert m["by_image_count"]["4"]["top1"] == 0.0
    # level1 right: rows 0,1,2,3,4 (not 5); level2 right: rows 0,2,3,4.
    assert m["by_level"]["level1"] == pytest.approx(5 / 6)
    assert m["by_level"]["level2"] == pytest.approx(4 / 6)
    assert m["by_level"]["level3"] == pytest.approx(2 / 6)
    pairs = {(p["true"], p["predicted"]): p["count"] for p in m["most_confused"]}
    assert pairs == {(22, 11): 1, (33, 44): 1, (44, 33): 1, (33, 22): 1}
    assert m["by_category"]["44"] == {"products": 2, "top1": 0.5}
    bins = {b["train_images"]: (b["products"], b["top1"]) for b in m["by_class_frequency"]}
    assert bins == {"0-9": (1, 1.0), "10-99": (1, 0.0), "100-999": (2, 0.0), "1000-9999": (2, 0.5)}
    assert demo.accuracy_on(m, [33, 44]) == {"products": 4, "top1": 0.25}
    json.dumps(m)  # metrics.json must be serialisable


def test_report_png(labels, tmp_path):
    m = metrics.compute_metrics([0, 1], [[0, 1], [0, 1]], [1, 3], labels, [1, 2, 3, 4])
    report.write_report(m, str(tmp_path / "report.png"))
    assert (tmp_path / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def _digest_table(tmp_path, rows):
    """rows: (jpeg bytes, category_id, count)."""
    path = tmp_path / record_schema.IMAGE_DIGESTS_FILE
    np.savez(
        path,
        digest=np.array([record_schema.image_digest(j) for j, _, _ in rows], np.int64),
        category_id=np.array([c for _, c, _ in rows], np.int64),
        count=np.array([n for _, _, n in rows], np.int64),
    )
    return duplicates.DigestTable(str(path))


def test_dup_lookup_overrides_on_match(labels, tmp_path):
    table = _digest_table(tmp_path, [(b"img-a", 44, 3), (b"img-a", 22, 1), (b"img-b", 33, 2), (b"img-z", 999, 9)])
    predictions = {
        "product_id": np.array([1, 2, 3, 4]),
        "top_classes": np.array([[0, 1, 2, 3]] * 4),
    }
    digests = {
        1: [record_schema.image_digest(b"img-a")],  # 44 (3 votes) beats 22 (1 vote)
        2: [record_schema.image_digest(b"img-c")],  # no match: the model's ranking stays
        3: [record_schema.image_digest(b"img-c"), record_schema.image_digest(b"img-b")],  # one image matches
        4: [record_schema.image_digest(b"img-z")],  # category unknown to the model: ignored
    }
    top, overridden = duplicates.apply_duplicate_lookup(predictions, digests, table, labels)
    assert overridden == 2
    assert top.tolist() == [[3, 1, 0, 2], [0, 1, 2, 3], [2, 0, 1, 3], [0, 1, 2, 3]]
    assert table.class_counts(labels).tolist() == [0, 1, 2, 3]


def test_submission_has_every_input_product(labels, tmp_path):
    data_dir = tmp_path / "test_data"
    data_dir.mkdir()
    rejected = [
        {"_id": 7, "source": "test.bson", "offset": 100, "reason": "not_jpeg", "detail": "imgs[0]"},
        {"_id": 1, "source": "test.bson", "offset": 0, "reason": "duplicate_id", "detail": "again"},
        {"_id": None, "source": "test.bson", "offset": 900, "reason": "corrupt_bson", "detail": "rest skipped"},
    ]
    (data_dir / "rejected-00000-of-00001.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rejected))
    entries = data_folder.read_rejected(str(data_dir))
    fallback = submission.most_frequent_category(labels, [1, 9, 3, 4])
    assert fallback == 22
    path = tmp_path / "submission.csv"
    summary = submission.write_submission(str(path), [1, 2, 3], labels.category_ids[[3, 0, 0]], entries, fallback)
    with open(path, newline="") as f:
        rows = list(csv.reader(f))
    assert rows[0] == ["_id", "category_id"]
    assert rows[1:] == [["1", "44"], ["2", "11"], ["3", "11"], ["7", "22"]]
    assert summary["rows"] == 4 and summary["rejected_without_id"] == 1
    valid = {str(c) for c in labels.category_ids}
    assert all(c in valid for _, c in rows[1:])


def _fixed_slot_model(slots=4, size=8):
    """A model.keras of before issue 28: its inputs fixed at `slots` image slots."""
    import keras

    images = keras.Input((slots, size, size, 3), dtype="uint8", name="images")
    mask = keras.Input((slots,), dtype="float32", name="mask")
    pooled = keras.layers.Flatten()(keras.layers.Lambda(lambda x: keras.ops.mean(
        keras.ops.cast(x[0], "float32"), axis=(2, 3)) * keras.ops.expand_dims(x[1], -1))([images, mask]))
    return keras.Model({"images": images, "mask": mask}, {"category": keras.layers.Dense(3)(pooled)})


def test_an_older_fixed_slot_model_evaluates_data_of_fewer_slots_and_names_more():
    """Issue 28: data converted with --max_images=2 is padded to an older model's 4 slots (masked
    out); data of 6 slots stops with one line naming the model, the data and the fix."""
    from model.errors import UserError
    from model.evaluation import predict

    model = _fixed_slot_model()
    probabilities = predict.probabilities_function(model, 8)
    images = np.random.default_rng(0).integers(0, 256, [2, 4, 8, 8, 3], dtype=np.uint8)
    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0]], np.float32)
    images[mask == 0] = 0
    np.testing.assert_allclose(probabilities(images[:, :2], mask[:, :2]).numpy(),
                               probabilities(images, mask).numpy(), rtol=1e-6)
    member = predict.Member("runs/old", "final", model, {})
    predict.check_slot_count(member, "data/six", 4)
    with pytest.raises(UserError, match=r"^runs/old: its model takes 4 image slots .* data/six has 6 .*--max_images=4"):
        predict.check_slot_count(member, "data/six", 6)


def test_two_evaluations_into_one_output_folder_do_not_race(tmp_path):
    """Issue 28, item 10: the second stops in one line naming the first, before reading anything,
    and the lock (OUT.lock, beside the folder) goes with the evaluation that held it."""
    import os

    from model.config import EvalConfig
    from model.errors import UserError
    from model.evaluation.evaluate import evaluate
    from model.training import run_lock

    out = str(tmp_path / "out")
    with run_lock.hold_output(out):
        assert os.path.exists(out + ".lock")
        with pytest.raises(UserError, match=rf"^{out} is in use by another evaluation \(pid {os.getpid()} on .*\); "
                                            r"wait for it to finish or stop it, or use another --output_dir$"):
            evaluate(EvalConfig(data_dir="data", model_dir=str(tmp_path / "m"), output_dir=out),
                     hold_output=run_lock.hold_output)
    assert not os.path.exists(out + ".lock") and not os.path.exists(out)
