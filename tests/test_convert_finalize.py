"""The finalize stage (beam_convert/finalize.py): each split's id list and the image digest table."""

import collections
import os

import numpy as np
import pytest

import record_schema
from tests.convert_helpers import SAMPLE_BSON, convert, read_records

pytestmark = pytest.mark.slow  # converts (a Beam job or a subprocess): not in make test-fast


def test_each_split_lists_its_product_ids_in_record_order(sample_output, tmp_path):
    for split in ("train", "val"):
        ids = np.load(sample_output / record_schema.product_ids_name(split))
        assert ids.dtype == np.int64
        assert ids.tolist() == [r["product_id"] for r in read_records(sample_output, split)]
    # Several ranges into several shards: still the shards' order.
    out = tmp_path / "ranges"
    assert convert(f"--input={SAMPLE_BSON}", f"--output_dir={out}", "--range_size=7", "--num_shards=3") == 0
    ids = np.load(out / record_schema.product_ids_name("train"))
    assert ids.tolist() == [r["product_id"] for r in read_records(out, "train")] and len(ids) > 60


def test_digest_table_holds_train_images(sample_output):
    table = np.load(os.path.join(sample_output, record_schema.IMAGE_DIGESTS_FILE))
    train = read_records(sample_output, "train")
    expected = collections.Counter(
        (record_schema.image_digest(image), r["category_id"]) for r in train for image in r["images"] if image)
    got = {(int(d), int(c)): int(n) for d, c, n in zip(table["digest"], table["category_id"], table["count"])}
    assert got == dict(expected)
