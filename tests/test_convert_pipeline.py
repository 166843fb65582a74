"""The conversion job end to end (python -m beam_convert), on real and hand-made BSON: what only the
whole job shows (every JPEG of the real sample byte for byte, the split by image digest over the
whole input, the package Dataflow workers install). The stages alone are tested in a TestPipeline
(test_convert_index.py, test_convert_convert.py, test_convert_finalize.py, test_convert_mix.py)."""

import os
import subprocess
import sys
import tarfile

import numpy as np
import pytest

from tests.convert_helpers import (
    REPO, convert, product, read_labels, read_metadata, read_records, sample_documents, sample_jpegs, write_bson)

pytestmark = pytest.mark.slow  # converts (a Beam job or a subprocess): not in make test-fast


def test_sample_every_product_and_jpeg_arrives_byte_identical(sample_output):
    documents = {doc["_id"]: doc for doc in sample_documents()}
    records = read_records(sample_output, "train") + read_records(sample_output, "val")
    assert len(records) == 82 == len(documents)
    assert sum(sum(r["mask"]) for r in records) == 110
    for record in records:
        source = [img["picture"] for img in documents[record["product_id"]]["imgs"]]
        count = len(source)
        assert record["images"][:count] == source
        assert record["images"][count:] == [b""] * (4 - count)
        assert record["mask"] == [1] * count + [0] * (4 - count)
        assert record["category_id"] == documents[record["product_id"]]["category_id"]
    metadata = read_metadata(sample_output)
    assert metadata["num_classes"] == 5270
    assert metadata["images_per_product"] == {"1": 67, "2": 7, "3": 3, "4": 5}
    assert metadata["rejected"] == {}
    assert sum(s["products"] for s in metadata["splits"].values()) == 82
    assert sum(s["images"] for s in metadata["splits"].values()) == 110


def test_sample_labels_map_back_to_category_ids(sample_output):
    rows = read_labels(sample_output)
    assert len(rows) == 5270
    assert [int(r["label"]) for r in rows] == list(range(5270))
    ids = [int(r["category_id"]) for r in rows]
    assert ids == sorted(ids)
    by_label = {int(r["label"]): r for r in rows}
    for record in read_records(sample_output, "train") + read_records(sample_output, "val"):
        assert int(by_label[record["label"]]["category_id"]) == record["category_id"]
    quoted = [r for r in rows if "," in r["category_level3"]]
    assert quoted, "the real file has level3 names holding commas"


def _write_products_over_image_groups(path, groups, count, seed):
    """`count` products, each showing one group's images in a random order."""
    rng = np.random.default_rng(seed)
    documents = []
    for product_id in range(count):
        group = groups[rng.integers(len(groups))]
        documents.append(product(product_id, [group[i] for i in rng.permutation(len(group))]))
    write_bson(path, documents)
    return documents


def _images_by_split(out):
    return {split: {image for r in read_records(out, split) for image in r["images"] if image}
            for split in ("train", "val")}


def test_products_repeating_the_same_images_land_on_one_side(tmp_path):
    jpegs = sample_jpegs()
    sizes = np.random.default_rng(1).integers(1, 4, size=len(jpegs))
    bounds = np.cumsum(sizes)
    groups = [jpegs[b - s:b] for s, b in zip(sizes, bounds) if b <= len(jpegs)]
    documents = _write_products_over_image_groups(tmp_path / "dup.bson", groups, 600, seed=0)
    out = tmp_path / "out"
    assert convert(f"--input={tmp_path / 'dup.bson'}", f"--output_dir={out}", "--val_fraction=0.3") == 0
    images = _images_by_split(out)
    assert images["train"] and images["val"]
    assert not images["train"] & images["val"]
    assert read_metadata(out)["split_overlap"]["images_on_both_sides"] == 0
    # The check can fail: a split by product id puts most of these images on both sides.
    naive = {"train": set(), "val": set()}
    for doc in documents:
        naive["val" if doc["_id"] % 10 < 3 else "train"].update(img["picture"] for img in doc["imgs"])
    assert len(naive["train"] & naive["val"]) > len(groups) // 2


def test_reports_images_that_partly_shared_products_put_on_both_sides(tmp_path):
    jpegs = sample_jpegs()
    rng = np.random.default_rng(2)
    # Overlapping groups: every product also shows a shared "placeholder" picture.
    groups = [[jpegs[0]] + [jpegs[i] for i in rng.choice(np.arange(1, len(jpegs)), 2, replace=False)]
              for _ in range(60)]
    _write_products_over_image_groups(tmp_path / "shared.bson", groups, 400, seed=3)
    out = tmp_path / "out"
    assert convert(f"--input={tmp_path / 'shared.bson'}", f"--output_dir={out}", "--val_fraction=0.3") == 0
    images = _images_by_split(out)
    overlap = read_metadata(out)["split_overlap"]
    assert overlap["images_on_both_sides"] == len(images["train"] & images["val"])
    assert overlap["train_distinct_images"] == len(images["train"])
    assert overlap["val_distinct_images"] == len(images["val"])


def test_sdist_carries_both_packages_and_requirements_but_no_sample_data(tmp_path):
    subprocess.run([sys.executable, "setup.py", "-q", "sdist", "--dist-dir", str(tmp_path)], cwd=REPO,
                   check=True, capture_output=True)
    (archive,) = tmp_path.glob("*.tar.gz")
    with tarfile.open(archive) as tar:
        names = tar.getnames()
        requires = next(tar.extractfile(n).read().decode() for n in names if n.endswith("requires.txt"))
    for module in ("beam_convert/__main__.py", "beam_convert/pipeline.py", "model/__init__.py", "model/training/loop.py",
                   "record_schema.py", "setup.py"):
        assert any(n.endswith(module) for n in names), module
    # Dataflow workers install this sdist: the synthetic data generator has no business there.
    assert not [n for n in names if "sample_data" in n or os.path.basename(n) == "synthetic.py"]
    for requirement in ("apache-beam", "pymongo", "google-crc32c", "tensorflow", "absl-py", "numpy"):
        assert requirement in requires, requirement
