"""Product validation and the split key (beam_convert/products.py)."""

import record_schema
from beam_convert import products
from tests.convert_helpers import product, sample_jpegs


JPEGS = sample_jpegs()


def test_to_product_pads_nothing_and_counts_extra_images():
    outcome = products.to_product(product(5, JPEGS[:6], 77), labels={77: 3}, max_images=4)
    assert outcome == products.Product(5, 77, 3, tuple(JPEGS[:4]), 2)


def test_to_product_unlabelled_ignores_labels():
    outcome = products.to_product(product(5, JPEGS[:1], None), labels=None)
    assert (outcome.category_id, outcome.label) == (-1, -1)


def test_split_key_ignores_image_order_and_the_split_is_stable():
    digests = [record_schema.image_digest(j) for j in JPEGS[:3]]
    key = products.split_key(digests)
    assert key == products.split_key(digests[::-1]) == min(digests)
    splits = [products.choose_split(products.split_key([record_schema.image_digest(j)]), 0.3) for j in JPEGS]
    assert 0.15 < splits.count("val") / len(splits) < 0.45
    assert products.choose_split(key, 0.0) == "train"


def test_to_product_rejects_a_category_id_in_an_unlabelled_file():
    outcome = products.to_product(product(5, JPEGS[:1], 77), labels=None)
    assert (outcome.product_id, outcome.reason) == (5, products.UNEXPECTED_CATEGORY)
