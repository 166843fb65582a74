"""A beam_convert-style data folder written in a plain loop from the real sample BSON, so that the
model-side tests do not depend on the converter, and the tiny train.py flags they train with."""

import dataclasses
import json
import os

import bson
import numpy as np

import record_schema
from beam_convert import categories as categories_lib

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
# The same code path as a real run, at a size that trains in seconds on 2 cores.
# --noinput_check: its ~5 s a start are tested in test_model_training_input_check.py and the demo.
TINY_TRAIN_FLAGS = ["--backbone=tiny", "--image_size=32", "--batch_size=8", "--sample_products=4",
                    "--warmup_epochs=0.5", "--bn_recalibration_steps=2", "--noinput_check"]


def sample_documents():
    with open(os.path.join(REPO, "data", "train_example.bson"), "rb") as f:
        return list(bson.decode_file_iter(f))


def write_data_dir(path, *, with_val=True, one_level1=False, shards=1, val_name="val"):
    """82 real products: every 5th to `val_name` (when with_val), the rest to train, each split in
    `shards` shards (records dealt round-robin); tree from category_names.csv (with one_level1,
    every class moved under one level1 node). Writes metadata.json (with each shard's records and
    bytes, as beam_convert does) and the product id lists."""
    import tensorflow as tf

    os.makedirs(path, exist_ok=True)
    docs = sample_documents()
    category_ids = sorted({d["category_id"] for d in docs})
    with open(os.path.join(REPO, "data", "category_names.csv"), encoding="utf-8") as f:
        tree = categories_lib.read_categories(f.read(), "category_names.csv")
    classes = [c for c in tree if c.category_id in set(category_ids)]
    if one_level1:
        classes = [dataclasses.replace(c, level1="ONE") for c in classes]
    with open(os.path.join(path, record_schema.LABELS_FILE), "w", encoding="utf-8") as f:
        f.write(categories_lib.labels_csv(classes))
    label_of = {c: i for i, c in enumerate(category_ids)}
    splits = ("train", val_name) if with_val else ("train",)
    ids = {split: [] for split in splits}
    writers = {split: [tf.io.TFRecordWriter(os.path.join(path, record_schema.shard_name(split, i, shards)))
                       for i in range(shards)] for split in splits}
    for i, d in enumerate(docs):
        split = val_name if with_val and i % 5 == 0 else "train"
        pictures = [img["picture"] for img in d["imgs"]]
        writers[split][len(ids[split]) % shards].write(
            record_schema.encode_example(d["_id"], d["category_id"], label_of[d["category_id"]], pictures))
        ids[split].append(d["_id"])
    for split in splits:
        for writer in writers[split]:
            writer.close()
        np.save(os.path.join(path, record_schema.product_ids_name(split)), np.array(ids[split], np.int64))
    counts = {split: {"products": len(ids[split]), "images": 0, record_schema.SHARD_FILES: {
        record_schema.shard_name(split, i, shards): {
            "records": len(ids[split][i::shards]),
            "bytes": os.path.getsize(os.path.join(path, record_schema.shard_name(split, i, shards)))}
        for i in range(shards)}} for split in splits}
    with open(os.path.join(path, record_schema.METADATA_FILE), "w") as f:
        json.dump({"schema_version": 1, "num_classes": len(category_ids), "max_images": 4, "splits": counts,
                   "images_per_product": {}, "rejected": {}}, f)
    return path


def spread_head(model, jpegs, mask, *, image_size, crop_size):
    """The initial network's pooled features barely differ from product to product (softmax ~uniform,
    top-k ties): rescale the category head so that its logits spread by a few units over these
    products (JPEG slots [N, 4] and their mask)."""
    import keras
    import tensorflow as tf

    from model.input_pipeline import decode

    head = model.get_layer("category")
    features = np.asarray(keras.Model(model.inputs, head.input)(
        {"images": decode.decode_images(jpegs, mask, image_size, crop_size=crop_size), "mask": tf.constant(mask)}))
    kernel = np.random.default_rng(0).normal(size=head.kernel.shape) * 4 / (features.std() * features.shape[1] ** 0.5)
    head.kernel.assign(kernel.astype(np.float32))
    head.bias.assign(-(features.mean(axis=0) @ kernel).astype(np.float32))
