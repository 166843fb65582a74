"""The TensorBoard sample grid (model/training/sample_grid.py): what it shows, checked on the
grid's pixels and the summary event."""

import glob
import io
import os

import numpy as np
import pytest
from PIL import Image

from model.input_pipeline.labels import Labels
from model.training import sample_grid

LONG_NAMES = ["COQUE TELEPHONE - BUMPER TELEPHONE", "HOUSSE - ETUI - CHAUSSETTE",
              "ACCESSOIRE FAUTEUIL ROULANT-PROTECTION DE FAUTEUIL ROULANT"]

SOLID = [(10, 40, 250), (250, 200, 10), (120, 10, 160)]  # one colour per product, not used by the grid


def batch(masks, side=48):
    masks = np.asarray(masks, np.float32)
    images = np.zeros([len(masks), masks.shape[1], side, side, 3], np.uint8)
    for i, colour in enumerate(SOLID[:len(masks)]):
        images[i][masks[i] > 0] = colour
    return {"images": images, "mask": masks, "product_id": np.array([1234567, 42, 7], np.int64)[:len(masks)]}


def count(grid, colour):
    return int((grid == np.array(colour, np.uint8)).all(axis=-1).sum())


@pytest.mark.parametrize("side,shown", [(32, 96), (48, 96), (180, 180)])
def test_grid_upscales_small_images_and_draws_real_slots_whole(side, shown):
    masks = [[1, 1, 1, 0], [1, 0, 0, 0], [1, 1, 0, 0]]
    grid = sample_grid.sample_grid(batch(masks, side), np.array([0, 1, -1]), ["11 A", "22 B"])
    assert grid.dtype == np.uint8 and grid.ndim == 3 and grid.shape[2] == 3
    slot = shown + 2 * sample_grid.BORDER
    assert grid.shape[1] >= 4 * slot + sample_grid.LABEL_WIDTH
    assert 3 * slot <= grid.shape[0] <= 3 * (slot + 40) + 80
    for colour, real in zip(SOLID, np.sum(masks, axis=1)):  # every real picture, whole, at its shown size
        assert count(grid, colour) == real * shown * shown


def test_grid_marks_padded_slots_red_and_real_ones_green():
    few = sample_grid.sample_grid(batch([[1, 1, 1, 1], [1, 1, 1, 0]]), np.array([0, 1]), None)
    many = sample_grid.sample_grid(batch([[1, 0, 0, 0], [1, 1, 1, 0]]), np.array([0, 1]), None)
    assert few.shape == many.shape
    frame = (96 + 2 * sample_grid.BORDER) ** 2 - 96 ** 2
    # Three more padded slots: three more red frames, three fewer green ones.
    assert count(many, sample_grid.PAD_COLOR) - count(few, sample_grid.PAD_COLOR) == 3 * frame
    assert count(few, sample_grid.REAL_COLOR) - count(many, sample_grid.REAL_COLOR) == 3 * frame
    assert count(few, sample_grid.PAD_COLOR) >= frame
    # A padded slot is filled dark and hatched, not left black like a zero image.
    assert count(many, sample_grid.PAD_FILL) > 3 * 96 * 96 // 2
    assert count(many, sample_grid.PAD_HATCH) > 0


def test_row_labels():
    assert sample_grid.row_lines(0, 1234567, 1, ["11 A", "1000010653 COQUE TELEPHONE - BUMPER TELEPHONE"], [1, 1, 0, 0]) == [
        "#1  product 1234567", "1000010653 COQUE TELEPHONE - BUMPER TELEPHONE", "2 real, 2 padded"]
    assert sample_grid.row_lines(2, 7, -1, ["11 A"], [1, 0, 0, 0])[1] == "(unlabelled)"
    assert sample_grid.row_lines(2, 7, 5, None, [1, 0, 0, 0])[1] == "class 5"


def test_row_text_is_drawn():
    """The label column holds dark text pixels in every row, more for a longer name."""
    masks = [[1, 0, 0, 0], [1, 0, 0, 0]]
    grid = sample_grid.sample_grid(batch(masks), np.array([0, 1]), ["1 A", "2 " + " ".join(LONG_NAMES)])
    label_column = grid[:, :sample_grid.LABEL_WIDTH]
    dark = (label_column.max(axis=-1) < 100)
    top, row = 2 * 17 + sample_grid.GAP, 96 + 2 * sample_grid.BORDER + sample_grid.GAP
    first, second = dark[top:top + row].sum(), dark[top + row:top + 2 * row].sum()
    assert first > 50 and second > first


def test_class_names():
    labels = Labels(category_ids=np.array([1000010653, 5]), level1=("A", "B"), level2=("a", "b"),
                    level3=("COQUE TELEPHONE - BUMPER TELEPHONE", ""), level1_index=np.array([0, 1]),
                    level2_index=np.array([0, 1]), level1_names=("A", "B"), level2_names=("A/a", "B/b"))
    assert sample_grid.class_names(labels) == ["1000010653 COQUE TELEPHONE - BUMPER TELEPHONE", "5"]


def test_summary_event_holds_the_grid(tmp_path):
    import tensorflow as tf

    features = {k: tf.constant(v) for k, v in batch([[1, 1, 0, 0], [1, 0, 0, 0]]).items()}
    grid = sample_grid.write_sample_grid(features, tf.constant([1, 0]), ["11 A", "22 B"], str(tmp_path), step=3)
    (event_file,) = glob.glob(os.path.join(tmp_path, "samples", "events.out.tfevents.*"))
    found = []
    for event in tf.compat.v1.train.summary_iterator(event_file):
        for value in event.summary.value:
            found.append(value.tag)
            assert event.step == 3
            assert "padded slot" in value.metadata.summary_description
            width, height, png = value.tensor.string_val
            assert (int(width), int(height)) == (grid.shape[1], grid.shape[0])
            assert np.array_equal(np.asarray(Image.open(io.BytesIO(png)).convert("RGB")), grid)
    assert found == ["training_products"]
