"""What the serving tests (test_model_export_validity.py, test_model_predict.py) export: the tiny
network on the labels of the 82 real products, its head spread over the products it will answer."""

import keras

from model.input_pipeline.labels import read_labels
from model.network.multi_image import ModelConfig, build_model
from tests.record_helpers import spread_head, write_data_dir


def spread_tiny_model(data_dir, jpegs, mask, *, image_size, crop_size):
    """(model, labels) after writing the data folder `data_dir` (no val split): the tiny network at
    crop_size px, seeded, with its logits spread over these products (JPEG slots [N, 4], mask) as
    decoded at image_size and centre-cropped, so that top-k answers depend on the pictures."""
    write_data_dir(data_dir, with_val=False)
    labels = read_labels(data_dir)
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(num_classes=labels.num_classes, image_size=crop_size, backbone="tiny"))
    spread_head(model, jpegs, mask, image_size=image_size, crop_size=crop_size)
    return model, labels
