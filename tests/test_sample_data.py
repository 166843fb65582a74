"""The synthetic Cdiscount generator: file layout, pictures, distributions and the split-class XOR.

Layout and pictures are checked on a few hundred rendered products; distributions on plans,
which carry no pixels, so tens of thousands of products stay cheap.
"""

import collections
import csv
import io
import pathlib
import subprocess
import sys

import bson
import numpy as np
import pytest
from PIL import Image

from sample_data import synthetic

REPO = pathlib.Path(__file__).resolve().parent.parent
DATA = REPO / "data"

TARGET = synthetic.IMAGES_PER_PRODUCT


@pytest.fixture(scope="module")
def small_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("synthetic") / "train.bson"
    summary = synthetic.write_bson(path, 400, seed=7)
    return path, summary


@pytest.fixture(scope="module")
def docs(small_file):
    with open(small_file[0], "rb") as f:
        return list(bson.decode_file_iter(f))


@pytest.fixture(scope="module")
def plans():
    return list(synthetic.plan_products(30000, seed=3))


def _real_category_rows():
    with open(DATA / "category_names.csv", newline="", encoding="utf-8") as f:
        return {int(row["category_id"]): row for row in csv.DictReader(f)}


def test_documents_decode_in_the_real_field_order(small_file, docs):
    path, summary = small_file
    assert len(docs) == summary["products"] == 400
    for doc in docs:
        assert list(doc) == ["_id", "imgs", "category_id"]
        assert all(list(img) == ["picture"] for img in doc["imgs"])
        assert 1 <= len(doc["imgs"]) <= 4
    assert summary["images"] == sum(len(d["imgs"]) for d in docs)
    assert summary["bytes"] == path.stat().st_size
    assert not path.with_name(path.name + ".partial").exists()


def test_ids_ascend_with_gaps_and_fit_int32(small_file, docs):
    ids = [d["_id"] for d in docs]
    assert ids == sorted(set(ids))
    assert ids[-1] - ids[0] + 1 > len(ids)  # not contiguous, like the real file
    assert ids[-1] < 2**31
    # int32 on disk, as in train.bson (element type 0x10 right after the document length).
    assert small_file[0].read_bytes()[4] == 0x10


def test_pictures_are_180px_rgb_jpegs_of_real_size(docs):
    sizes = []
    for doc in docs:
        for img in doc["imgs"]:
            data = img["picture"]
            assert data[:3] == b"\xff\xd8\xff"
            with Image.open(io.BytesIO(data)) as picture:
                assert picture.format == "JPEG" and picture.mode == "RGB" and picture.size == (180, 180)
            sizes.append(len(data))
    sizes = np.array(sizes)
    assert 5000 <= sizes.mean() <= 8000, sizes.mean()
    assert sizes.min() >= 3000 and sizes.max() <= 12000, (sizes.min(), sizes.max())


def test_same_seed_same_bytes_other_seed_other_bytes(tmp_path, small_file):
    again = tmp_path / "again.bson"
    other = tmp_path / "other.bson"
    synthetic.write_bson(again, 400, seed=7)
    synthetic.render_picture.cache_clear()  # the bytes must not depend on the cache
    synthetic.write_bson(other, 400, seed=8)
    assert again.read_bytes() == small_file[0].read_bytes()
    assert other.read_bytes() != again.read_bytes()


def test_unlabelled_is_the_same_products_without_category_id(tmp_path, docs):
    path = tmp_path / "test.bson"
    summary = synthetic.write_bson(path, 400, seed=7, labelled=False)
    with open(path, "rb") as f:
        unlabelled = list(bson.decode_file_iter(f))
    assert summary["labelled"] is False
    assert all(list(d) == ["_id", "imgs"] for d in unlabelled)
    assert [(d["_id"], d["imgs"]) for d in unlabelled] == [(d["_id"], d["imgs"]) for d in docs]


def test_images_per_product_follows_the_real_distribution(plans, small_file):
    counts = collections.Counter(len(p.pictures) for p in plans)
    for k, share in TARGET.items():
        assert counts[k] / len(plans) == pytest.approx(share, abs=0.015), (k, counts)
    # The written summary agrees with the plans' law too, on a smaller sample.
    histogram = small_file[1]["images_per_product"]
    assert sum(histogram.values()) == 400
    assert histogram["1"] / 400 == pytest.approx(TARGET[1], abs=0.08)


def test_a_moderate_share_of_pictures_is_shared_between_products(plans):
    pictures = [pic for p in plans for pic in p.pictures]
    unique = len(set(pictures)) / len(pictures)
    assert 0.55 <= unique <= 0.75, unique  # the real training set: 7.8M of 12.4M unique
    # Copies are of originals only, so the groups of products sharing a picture stay small.
    originals = {p.product_id for p in plans if p.copy_of is None}
    assert all(p.copy_of in originals for p in plans if p.copy_of is not None)
    assert max(collections.Counter(p.copy_of for p in plans if p.copy_of is not None).values()) < 15


def test_category_ids_are_real_and_the_split_ids_are_exposed():
    rows = _real_category_rows()
    ids = synthetic.category_ids(20)
    assert len(set(ids)) == 20 and all(cid in rows for cid in ids)
    assert list(synthetic.SPLIT_CATEGORY_IDS) == synthetic.split_category_ids(20, 4) == ids[16:]
    assert synthetic.split_class_pairs(20, 4) == [(ids[16], ids[17]), (ids[18], ids[19])]
    assert synthetic.split_category_ids(10, 0) == []


def test_regular_cues_are_distinct_and_split_cues_are_their_own():
    cues = synthetic.class_cues(64 + 16, 16)
    regular = [c for (c,) in cues[:64]]
    assert len(set(regular)) == 64
    split = {c for pair in cues[64:] for c in pair}
    assert len(split) == 16 and not split & set(regular)
    with pytest.raises(ValueError):
        synthetic.class_cues(20, 3)  # split classes come in pairs
    with pytest.raises(ValueError):
        synthetic.class_cues(2, 4)


def test_split_classes_have_several_images_and_form_an_xor(plans):
    cues = synthetic.class_cues()
    for same_id, mixed_id in synthetic.split_class_pairs():
        by_class = {cid: [p for p in plans if p.category_id == cid] for cid in (same_id, mixed_id)}
        shown = {}
        for cid, products in by_class.items():
            assert len(products) > 1000
            assert all(len(p.pictures) >= 2 for p in products)
            pair = cues[products[0].label]
            # Which of the pair's two cues each picture shows, per product.
            shown[cid] = [[pair.index(cue) for cue, _ in p.pictures] for p in products]
        # The class is decided by the images together ...
        assert all(len(set(s)) == 1 for s in shown[same_id])
        assert all(len(set(s)) == 2 for s in shown[mixed_id])
        # ... while each picture alone, and the image count, look the same under both classes.
        for cid in (same_id, mixed_id):
            first = np.mean([s[0] for s in shown[cid]])
            every = np.mean([c for s in shown[cid] for c in s])
            assert first == pytest.approx(0.5, abs=0.04) and every == pytest.approx(0.5, abs=0.04), cid
        counts = {cid: collections.Counter(len(s) for s in shown[cid]) for cid in shown}
        for k in (2, 3, 4):
            share = [counts[cid][k] / len(shown[cid]) for cid in shown]
            assert share[0] == pytest.approx(share[1], abs=0.05), (k, counts)


def test_pictures_show_their_cue_colour():
    # Red and blue stars are a split pair: the picture must carry the colour the plan says.
    for colour, channel in (("red", 0), ("blue", 2)):
        for seed in range(5):
            data = synthetic.render_picture(synthetic.Cue("star", colour), seed)
            pixels = np.asarray(Image.open(io.BytesIO(data)).convert("RGB"), dtype=int)
            others = np.delete(pixels, channel, axis=2).max(axis=2)
            assert ((pixels[..., channel] - others) > 90).sum() > 150, (colour, seed)


def test_write_categories_csv_keeps_real_names_and_quoting(tmp_path):
    rows = _real_category_rows()
    quoted = 1000019289  # VELO ENFANT (10"" - 12"" ...), a field with quotes and commas
    ids = synthetic.category_ids(5) + [quoted, 42]
    path = tmp_path / "categories.csv"
    synthetic.write_categories_csv(path, ids)
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.reader(f)
        assert tuple(next(reader)) == synthetic.CATEGORIES_HEADER
        written = {int(r[0]): r for r in reader}
    assert sorted(written) == sorted(ids)
    for cid in ids[:-1]:
        assert written[cid][1:] == [rows[cid][k] for k in synthetic.CATEGORIES_HEADER[1:]]
    assert written[42][1] == "SYNTHETIC"


def test_command_line_writes_file_and_categories(tmp_path):
    out, cats = tmp_path / "cli.bson", tmp_path / "cats.csv"
    result = subprocess.run(
        [sys.executable, "-m", "sample_data.synthetic", f"--output={out}", "--products=30",
         "--classes=6", "--split_classes=2", "--seed=1", "--unlabelled", f"--categories_out={cats}"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert len(result.stdout.strip().splitlines()) == 1 and "30 products" in result.stdout
    with open(out, "rb") as f:
        assert all("category_id" not in d for d in bson.decode_file_iter(f))
    with open(cats, newline="", encoding="utf-8") as f:
        assert [int(r["category_id"]) for r in csv.DictReader(f)] == sorted(synthetic.category_ids(6))


def test_command_line_rejects_impossible_classes_in_one_line(tmp_path):
    out = tmp_path / "bad.bson"
    result = subprocess.run(
        [sys.executable, "-m", "sample_data.synthetic", f"--output={out}", "--products=5", "--classes=2"],
        cwd=REPO, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode != 0
    assert len(result.stderr.strip().splitlines()) == 1 and "num_split_classes" in result.stderr
    assert list(tmp_path.iterdir()) == []
