"""Ensembles and the image-level duplicate lookup on tiny hand-made inputs: the arithmetic of the
combination and of the fusion, the flag checks, and top_k.npz against docs/FORMATS.md."""

import pathlib
import re

import numpy as np
import pytest

import record_schema
from beam_convert import categories as categories_lib
from model.errors import UserError
from model.evaluation import duplicates, ensemble, top_k_file
from model.input_pipeline import labels as labels_lib

REPO = pathlib.Path(__file__).resolve().parents[1]


def labels_of(tmp_path, category_ids, name="labels.csv"):
    path = tmp_path / name
    path.write_text(categories_lib.labels_csv([categories_lib.Category(c, "A", "p", f"leaf{c}") for c in category_ids]),
                    encoding="utf-8")
    return labels_lib.read_labels(str(path))


def test_arithmetic_mean_is_the_weighted_average():
    a = np.array([[0.7, 0.2, 0.1], [0.1, 0.1, 0.8]])
    b = np.array([[0.1, 0.6, 0.3], [0.2, 0.5, 0.3]])
    np.testing.assert_allclose(ensemble.combine([a, b], [1, 1]), (a + b) / 2, rtol=1e-6)
    np.testing.assert_allclose(ensemble.combine([a, b], [3, 1]), 0.75 * a + 0.25 * b, rtol=1e-6)
    # Row 1: a says class 2 (0.8), b class 1 (0.5); together class 2 (0.55 against 0.3).
    assert ensemble.combine([a, b], [1, 1])[1].argmax() == 2


def test_geometric_mean_is_the_normalised_weighted_product():
    a = np.array([[0.5, 0.5, 0.0], [0.25, 0.25, 0.5]])
    b = np.array([[0.8, 0.1, 0.1], [0.25, 0.5, 0.25]])
    got = ensemble.combine([a, b], [1, 1], "geometric")
    expected = np.sqrt(np.maximum(a, 1e-12) * b)
    np.testing.assert_allclose(got, expected / expected.sum(axis=1, keepdims=True), rtol=1e-5)
    assert got[0, 2] < 1e-5  # ruled out by a: ruled out
    np.testing.assert_allclose(got.sum(axis=1), 1.0, rtol=1e-6)
    # Weights are exponents: weight 0 ignores a member.
    np.testing.assert_allclose(ensemble.combine([a, b], [0, 1], "geometric"), b, rtol=1e-5)


def test_an_ensemble_of_one_model_twice_is_that_model():
    p = np.random.default_rng(0).dirichlet(np.ones(6), size=4)
    for mean in ensemble.MEANS:
        np.testing.assert_allclose(ensemble.combine([p, p], [1, 2], mean), p, rtol=1e-5)


def test_weights_one_per_model_or_a_clear_error():
    dirs = ["runs/a", "runs/b"]
    np.testing.assert_allclose(ensemble.member_weights(None, dirs), [0.5, 0.5])
    np.testing.assert_allclose(ensemble.member_weights("3,1", dirs), [0.75, 0.25])
    with pytest.raises(UserError, match=r"--ensemble_weights has 3 weights for 2 models \(runs/a, runs/b\)"):
        ensemble.member_weights("1,2,3", dirs)
    with pytest.raises(UserError, match="must be numbers"):
        ensemble.member_weights("1,x", dirs)
    with pytest.raises(UserError, match="non-negative with a positive sum"):
        ensemble.member_weights("1,-1", dirs)


def test_checkpoints_one_for_all_or_one_per_model():
    dirs = ["a", "b", "c"]
    assert ensemble.member_checkpoints("best", dirs) == ["best"] * 3
    assert ensemble.member_checkpoints("final,best,final", dirs) == ["final", "best", "final"]
    with pytest.raises(UserError, match="--checkpoint has 2 values for 3 models"):
        ensemble.member_checkpoints("final,best", dirs)
    with pytest.raises(UserError, match="--checkpoint must be final or best, got 'last'"):
        ensemble.member_checkpoints("last", dirs)


def test_an_ensemble_listing_one_model_twice_is_refused_in_one_line(tmp_path, monkeypatch):
    """Issue 28, item 8: the same folder's same checkpoint twice, however spelled, costs twice and
    weighs twice without a word: refused before any model is loaded. Its final and best are two."""
    from model.config import EvalConfig
    from model.evaluation.evaluate import evaluate

    monkeypatch.chdir(tmp_path)
    with pytest.raises(UserError, match=r"^--model_dir lists runs/a twice \(final model, also as \./runs/a/\): "
                                        r"an ensemble member counts once; to weigh it more, use --ensemble_weights$"):
        evaluate(EvalConfig(data_dir="data", model_dir="runs/a,runs/b,./runs/a/", split="val"))
    with pytest.raises(UserError, match="lists gs://b/r twice"):
        ensemble.check_distinct(["gs://b/r", "gs://b/r/"], ["best", "best"])
    ensemble.check_distinct(["runs/a", "runs/a"], ["final", "best"])
    ensemble.check_distinct(["runs/a", "runs/ab"], ["final", "final"])


def test_members_with_other_classes_are_named(tmp_path):
    same = labels_of(tmp_path, [11, 22, 33], "a.csv")
    other = labels_of(tmp_path, [11, 22, 44], "c.csv")
    ensemble.check_same_classes(["runs/a", "runs/b"], [same, labels_of(tmp_path, [11, 22, 33], "b.csv")])
    with pytest.raises(UserError, match=r"^runs/a/labels.csv and runs/c/labels.csv differ"):
        ensemble.check_same_classes(["runs/a", "runs/b", "runs/c"], [same, same, other])


def _table(tmp_path, rows):
    """rows: (jpeg bytes, category_id, count)."""
    path = tmp_path / record_schema.IMAGE_DIGESTS_FILE
    np.savez(path, digest=np.array([record_schema.image_digest(j) for j, _, _ in rows], np.int64),
             category_id=np.array([c for _, c, _ in rows], np.int64), count=np.array([n for _, _, n in rows], np.int64))
    return duplicates.DigestTable(str(path))


def test_image_matches_per_picture(tmp_path):
    labels = labels_of(tmp_path, [11, 22, 33, 44])
    table = _table(tmp_path, [(b"a", 44, 3), (b"a", 22, 1), (b"b", 33, 2), (b"z", 999, 5)])
    d = record_schema.image_digest
    matches = duplicates.image_matches({
        1: [d(b"x"), d(b"a")],  # slot 1 seen under 44 (3 times) and 22 (once)
        2: [d(b"x")],  # not seen
        3: [d(b"b"), d(b"a"), d(b"y")],  # slots 0 and 1
        4: [d(b"z")],  # seen only under a category the model does not know: no match
    }, table, labels)
    assert sorted(matches) == [1, 3]
    assert matches[1].slots == (1,) and matches[1].distribution == {3: 0.75, 1: 0.25}
    assert matches[3].slots == (0, 1) and matches[3].distribution == {2: 1.0, 3: 0.75, 1: 0.25}

    mask = np.array([[1, 1, 0, 0], [1, 0, 0, 0], [1, 1, 1, 0]], np.float32)
    rest, rows = duplicates.rest_mask([1, 2, 3], mask, matches)
    assert rows.tolist() == [0, 2]
    assert rest.tolist() == [[1, 0, 0, 0], [1, 0, 0, 0], [0, 0, 1, 0]]
    assert mask[0, 1] == 1  # the batch's own mask is left alone


def test_image_level_fusion_is_the_mean_over_pictures(tmp_path):
    found = [duplicates.ImageMatches((1,), {3: 0.75, 1: 0.25}),  # 1 of 3 pictures matched
             duplicates.ImageMatches((0, 1), {2: 1.0, 3: 1.0}),  # both pictures matched: no model
             duplicates.ImageMatches((0,), {0: 1.0})]  # 1 of 4 matched
    rest_p = np.array([[0.1, 0.1, 0.2, 0.6], [9, 9, 9, 9], [0.0, 0.4, 0.6, 0.0]], np.float32)
    model_p = np.array([[0.25] * 4, [0.1, 0.1, 0.2, 0.6], [0.25] * 4])  # the whole product's prediction
    fused = duplicates.fuse_image_level(found, rest_p, np.array([2, 0, 3]), model_p)
    np.testing.assert_allclose(fused[0], (np.array([0, 0.25, 0, 0.75]) + 2 * rest_p[0]) / 3, atol=1e-5)
    np.testing.assert_allclose(fused[1], [0, 0, 0.5, 0.5], atol=1e-5)
    np.testing.assert_allclose(fused[2], (np.array([1.0, 0, 0, 0]) + 3 * rest_p[2]) / 4, atol=1e-5)
    np.testing.assert_allclose(fused.sum(axis=1), 1.0, rtol=1e-6)
    # The other pictures can outvote a matched one (row 2: class 2 at 0.45 beats the match's 0.25).
    assert fused[2].argmax() == 2
    # Row 1's tie (a picture seen once under each of two categories) goes the model's way: class 3.
    assert fused[1].argmax() == 3
    model_p[1] = [0.1, 0.1, 0.6, 0.2]
    assert duplicates.fuse_image_level(found, rest_p, np.array([2, 0, 3]), model_p)[1].argmax() == 2


def documented_top_k_arrays() -> dict:
    """array -> (dtype, shape) from docs/FORMATS.md's top_k.npz table."""
    text = (REPO / "docs" / "FORMATS.md").read_text(encoding="utf-8")
    section = text[text.index("**`top_k.npz`**"):]
    section = section[:section.index("\n\n", section.index("|"))]
    rows = re.findall(r"^\| `(\w+)` \| (\w+) \| (\[[^\]]*\]) \|", section, flags=re.M)
    return {name: (dtype, shape) for name, dtype, shape in rows}


def test_top_k_file_is_the_documented_one(tmp_path):
    assert documented_top_k_arrays() == top_k_file.ARRAYS
    path = str(tmp_path / top_k_file.FILE)
    classes = np.array([[2, 0, 1], [1, 2, 0]])
    top_k_file.write_top_k(path, product_id=[7, 9], label=[2, -1], top_classes=classes,
                           top_probabilities=np.array([[0.5, 0.3, 0.2], [0.6, 0.3, 0.1]]),
                           category_ids=np.array([11, 22, 33]), k=2)
    arrays = top_k_file.read_top_k(path)
    assert sorted(arrays) == sorted(top_k_file.ARRAYS)
    for name, (dtype, shape) in top_k_file.ARRAYS.items():
        assert arrays[name].dtype == np.dtype(dtype), name
        assert arrays[name].ndim == shape.count(",") + 1, name
    assert arrays["category_id"].tolist() == [[33, 11], [22, 33]]
    np.testing.assert_allclose(arrays["probability"], [[0.5, 0.3], [0.6, 0.3]])
    assert arrays["label"].tolist() == [2, -1] and arrays["product_id"].tolist() == [7, 9]
