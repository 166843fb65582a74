"""Class-mixed training batches from a catalogue dumped in category order (issue 17 item 4).

A mongodump of a collection sorted by category gives a BSON whose stretches hold one category
each. Shards cut from it in input order made training batches of few classes (the 16 shards read
at a time are 16 stretches of the catalogue); beam_convert/mix.py deals every range into every
shard instead. Measured here through the training stream itself (create_dataset), against what a
uniform shuffle of the same products gives.
"""

import numpy as np
import pytest

import record_schema
from model.input_pipeline.dataset import create_dataset
from tests.convert_helpers import convert, product, sample_jpegs, write_bson

pytestmark = pytest.mark.slow  # converts (a Beam job): not in make test-fast

CATEGORIES = 120
PER_CATEGORY = 20
BATCH = 32
SHUFFLE_BUFFER = 128  # small, as a share of the data, as 2,048-16,384 records are of train.bson's 7 M
RANGE_SIZE = 200  # 12 index ranges, so 12 shards (the default: one per range)


def _category_sorted_bson(path):
    """CATEGORIES x PER_CATEGORY products in category order, ids in no particular order, one
    real JPEG each (data/train_example.bson's pictures, reused)."""
    rng = np.random.default_rng(0)
    jpegs = sample_jpegs()
    ids = rng.choice(10**9, CATEGORIES * PER_CATEGORY, replace=False)
    documents = [product(int(product_id), [jpegs[n % len(jpegs)]], category_id=1000 + n // PER_CATEGORY)
                 for n, product_id in enumerate(ids)]
    write_bson(path, documents)
    return np.repeat(np.arange(CATEGORIES), PER_CATEGORY)


def _distinct_per_batch(batches) -> float:
    return float(np.mean([len(np.unique(labels)) for labels in batches]))


def _uniform_distinct(labels, batches=2000) -> float:
    """Distinct classes in a batch drawn uniformly without replacement from the products."""
    rng = np.random.default_rng(1)
    return _distinct_per_batch(rng.choice(labels, BATCH, replace=False) for _ in range(batches))


def test_a_category_sorted_input_gives_class_mixed_batches(tmp_path):
    labels = _category_sorted_bson(tmp_path / "sorted.bson")
    out = tmp_path / "out"
    assert convert(f"--input={tmp_path / 'sorted.bson'}", f"--output_dir={out}", "--val_fraction=0",
                   f"--range_size={RANGE_SIZE}") == 0
    assert len(list(out.glob("train-*.tfrecord"))) == 12
    batches = []
    for seed in range(3):  # three epochs of different file orders and shuffles
        dataset = create_dataset(str(out / record_schema.shard_pattern("train")), batch_size=BATCH, training=True,
                                 image_size=16, shuffle_buffer=SHUFFLE_BUFFER, seed=seed)
        batches += [label.numpy() for _, label in dataset]
    assert len(batches) == 3 * (len(labels) // BATCH)
    mixed, uniform = _distinct_per_batch(batches), _uniform_distinct(labels)
    print(f"distinct classes per batch of {BATCH}: {mixed:.1f}, uniform {uniform:.1f}, ratio {mixed / uniform:.2f}")
    assert mixed >= 0.8 * uniform
