"""The models over a split: each product's top-k classes and probabilities, in input order.

One model or an ensemble (ensemble.py): every member predicts the same batch, each from its own
decode of the records (its image size), and only the combined top k are kept: the full [N, K]
matrix of the real val split (~350k x 5,270) would not fit in memory. The image-level duplicate
lookup (duplicates.py) runs here too, since it needs the model's prediction from a product's
other pictures, batch by batch.
"""

from __future__ import annotations

import collections
import dataclasses
import json
import time

import numpy as np
import tensorflow as tf

import record_schema
from model import signals
from model.config import ImageSpec
from model.errors import UserError
from model.evaluation import duplicates, ensemble
from model.model_dir import RunFolder

TOP_K = 5


@dataclasses.dataclass
class Member:
    """One trained model of an evaluation: its folder, which of its models, and its weight."""
    model_dir: str
    checkpoint: str
    model: object  # keras.Model
    config: dict  # train_config.json
    weight: float = 1.0

    @property
    def image(self) -> ImageSpec:
        """How this model reads its pictures, as it was trained (its train_config.json)."""
        return ImageSpec.from_train_json(self.config["train"])

    @property
    def fusion(self) -> str:
        return str(self.config["model"].get("fusion", ""))


def load_model(model_dir: str, checkpoint: str = "final"):
    """model.keras (final) or best.keras (best) plus the train config (image size, model config)
    that train.py wrote beside it."""
    from model.network import keras_file

    path = RunFolder(model_dir).model(checkpoint)
    if not tf.io.gfile.exists(path):
        if checkpoint == "best":
            raise UserError(f"{path} is absent: --checkpoint=best needs a run trained with a val split "
                            f"(best.keras is kept by val top-1); use --checkpoint=final")
        raise UserError(f"{path} is absent: train first (python train.py ...)")
    with tf.io.gfile.GFile(RunFolder(model_dir).config_file) as f:
        config = json.load(f)
    model = keras_file.load(path)
    return model, config


def model_slots(model) -> int | None:
    """The image slots a model takes: None for any number (every model trained since they are
    shared over slots), else the fixed count of an older model.keras."""
    (images,) = [tensor for tensor in model.inputs if len(tensor.shape) == 5]
    return images.shape[1]


def check_slot_count(member: Member, data_dir: str, data_slots: int) -> None:
    """One line when a member cannot read the data's slots: an older model of fixed slots reads
    fewer (the rest padded, masked out) but not more."""
    slots = model_slots(member.model)
    if slots is not None and data_slots > slots:
        raise UserError(f"{member.model_dir}: its model takes {slots} image slots (trained before models took "
                        f"any number), {data_dir} has {data_slots} (metadata.json max_images): convert with "
                        f"--max_images={slots}, or train the model again")


def probabilities_function(model, image_size: int, *, flip_tta: bool = False):
    """(images uint8 [B, M, S, S, 3], mask [B, M]) -> softmax [B, K] float32, traced once for
    any batch size and slot count (an older model of fixed slots gets its padding added).
    flip_tta averages the product's and its left-right mirror's softmax."""
    spec = [tf.TensorSpec([None, None, image_size, image_size, 3], tf.uint8),
            tf.TensorSpec([None, None], tf.float32)]
    slots = model_slots(model)

    @tf.function(input_signature=spec)
    def probabilities(images, mask):
        if slots is not None:  # padded slots (mask 0) never reach an output
            missing = slots - tf.shape(mask)[1]
            images = tf.pad(images, [[0, 0], [0, missing], [0, 0], [0, 0], [0, 0]])
            mask = tf.ensure_shape(tf.pad(mask, [[0, 0], [0, missing]]), [None, slots])
            images = tf.ensure_shape(images, [None, slots, image_size, image_size, 3])
        p = tf.nn.softmax(tf.cast(model({"images": images, "mask": mask}, training=False)["category"], tf.float32))
        if flip_tta:
            flipped = tf.reverse(images, axis=[3])  # [B, M, H, W, C]: W is axis 3
            logits = model({"images": flipped, "mask": mask}, training=False)["category"]
            p = (p + tf.nn.softmax(tf.cast(logits, tf.float32))) / 2.0
        return p

    return probabilities


def _top(probabilities: np.ndarray, k: int) -> tuple[np.ndarray, np.ndarray]:
    """Top-k class indices and probabilities a row, best first (ties: the lower class first)."""
    k = min(k, probabilities.shape[-1])
    order = np.argsort(-probabilities, axis=-1, kind="stable")[:, :k]
    return order.astype(np.int64), np.take_along_axis(probabilities, order, axis=-1).astype(np.float32)


def predict_top_k(members: list[Member], datasets: list, *, k: int = TOP_K, flip_tta: bool = False,
                  mean: str = "arithmetic", image_matches: dict | None = None, total: int | None = None,
                  progress_every: float = 10.0, log=print) -> dict:
    """Runs every member over the same (features, label) batches; returns per-product arrays in
    input order.

    datasets[i] feeds members[i] (the same records, decoded at that member's image size; members
    may share one dataset object). Their batches must list the same products, checked batch by batch.

    Returns product_id, label, num_images [N]; top_classes, top_probabilities [N, k] (the
    combined probabilities, before any duplicate lookup); member_top_classes (one [N, min(k, 5)]
    per member); with image_matches (duplicates.image_matches) also image_top_classes,
    image_top_probabilities [N, k] after the image-level lookup and image_matched [N] bool.
    """
    weights = [m.weight for m in members]
    functions = [probabilities_function(m.model, m.image.side, flip_tta=flip_tta) for m in members]
    member_k = min(k, TOP_K)
    out = collections.defaultdict(list)
    start = last = time.perf_counter()
    done = 0
    for batches in _member_batches(members, datasets):
        features, label = batches[0]
        product_id = features[record_schema.PRODUCT_ID].numpy()
        mask = features[record_schema.MASK].numpy()
        member_p = [f(b[0][record_schema.IMAGES], b[0][record_schema.MASK]).numpy() for f, b in zip(functions, batches)]
        combined = ensemble.combine(member_p, weights, mean) if len(members) > 1 else member_p[0]
        classes, probabilities = _top(combined, k)
        out["product_id"].append(product_id)
        out["label"].append(label.numpy())
        out["num_images"].append(mask.sum(axis=1).round().astype(np.int64))
        out["top_classes"].append(classes)
        out["top_probabilities"].append(probabilities)
        for i, p in enumerate(member_p):
            out[f"member_{i}"].append(_top(p, member_k)[0])
        if image_matches is not None:
            looked_up, matched = _image_level(members, functions, batches, combined, product_id, mask,
                                              image_matches, weights, mean)
            classes, probabilities = _top(looked_up, k)
            out["image_top_classes"].append(classes)
            out["image_top_probabilities"].append(probabilities)
            out["image_matched"].append(matched)
        done += len(product_id)
        now = time.perf_counter()
        if now - last >= progress_every:
            last = now
            of = f"/{total}" if total else ""
            log(f"  predicted {done}{of} products ({done / (now - start):.0f} products/s)")
    log(f"  predicted {done} products in {time.perf_counter() - start:.1f} s")
    if not out:
        return _no_products(len(members), k, member_k, image_level=image_matches is not None)
    result = {name: np.concatenate(parts) for name, parts in out.items() if not name.startswith("member_")}
    result["member_top_classes"] = [np.concatenate(out[f"member_{i}"]) for i in range(len(members))]
    return result


def _member_batches(members: list[Member], datasets: list):
    """Each step's batch of every member (datasets[i] feeds members[i]), the records read once per
    distinct dataset (members decoding at the same size share one); every member's batch must
    list the first member's products. A requested stop (model.signals) raises between batches."""
    unique = list({id(d): d for d in datasets}.values())
    position = {id(d): i for i, d in enumerate(unique)}
    for batches in zip(*unique):
        signals.raise_if_requested()
        batches = [batches[position[id(d)]] for d in datasets]
        product_id = batches[0][0][record_schema.PRODUCT_ID].numpy()
        for (other, _), member in zip(batches[1:], members[1:]):
            if not np.array_equal(other[record_schema.PRODUCT_ID].numpy(), product_id):
                raise UserError(f"{member.model_dir}: its input batches list other products than "
                                f"{members[0].model_dir}'s (the split changed while it was read?)")
        yield batches


def _no_products(members: int, k: int, member_k: int, *, image_level: bool) -> dict:
    """predict_top_k's arrays for a split with no product."""
    empty = {"product_id": np.zeros([0], np.int64), "label": np.zeros([0], np.int64),
             "num_images": np.zeros([0], np.int64), "top_classes": np.zeros([0, k], np.int64),
             "top_probabilities": np.zeros([0, k], np.float32),
             "member_top_classes": [np.zeros([0, member_k], np.int64) for _ in range(members)]}
    if image_level:
        empty.update(image_top_classes=empty["top_classes"], image_top_probabilities=empty["top_probabilities"],
                     image_matched=np.zeros([0], bool))
    return empty


def _image_level(members, functions, batches, combined, product_id, mask, image_matches, weights, mean):
    """The batch's probabilities after the image-level lookup, and which rows had a match."""
    rest, rows = duplicates.rest_mask(product_id, mask, image_matches)
    matched = np.zeros(len(product_id), bool)
    looked_up = combined.copy()
    if not len(rows):
        return looked_up, matched
    matched[rows] = True
    rest_images = rest[rows].sum(axis=1).round()
    predict_rows = rows[rest_images > 0]  # a product whose every picture matched needs no model
    rest_p = np.zeros([len(rows), combined.shape[-1]], np.float32)
    if len(predict_rows):
        rest_mask = tf.constant(rest[predict_rows])
        member_p = [f(tf.gather(b[0][record_schema.IMAGES], predict_rows), rest_mask).numpy()
                    for f, b in zip(functions, batches)]
        rest_p[rest_images > 0] = ensemble.combine(member_p, weights, mean) if len(members) > 1 else member_p[0]
    found = [image_matches[int(product_id[r])] for r in rows]
    looked_up[rows] = duplicates.fuse_image_level(found, rest_p, rest_images, combined[rows])
    return looked_up, matched
