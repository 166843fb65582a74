"""model/export.py: check_slots on good and bad slots (JPEG start and end markers, the mask), and a
tiny untrained model exported and its serving signature called in-process on real JPEG bytes
(data/train_example.bson): the declared signature, the answer as the model's on the evaluation
decoding with the labels' category ids, top-k cut to the classes there are, bad products -1; with
and without flip TTA, the answer evaluate.py's predict_top_k gives on the same products.

What a bad slot does to the rest of a batch is test_model_export_validity's; the trained model's
SavedModel, loaded in a fresh process, is test_model_training_run's."""

import os

import keras
import numpy as np
import pytest
import tensorflow as tf

import record_schema
from model import export
from model.evaluation.predict import Member, predict_top_k
from model.input_pipeline import create_dataset, decode
from model.input_pipeline.labels import Labels, read_labels
from model.network.multi_image import ModelConfig, build_model
from tests.record_helpers import sample_documents, write_data_dir

NOT_JPEG = "not a JPEG (no FF D8 FF start)"
TRUNCATED = "truncated JPEG (no FF D9 end marker)"


@pytest.fixture(scope="module")
def jpegs() -> list[bytes]:
    """Three real Cdiscount pictures."""
    return [img["picture"] for doc in sample_documents()[:3] for img in doc["imgs"]][:3]


def slots(jpegs, spec):
    """A product's 4 slots from a spec: "jpeg", "png", "cut" (the end marker cut off), "tail10" /
    "tail100" (10 / 100 bytes after the end marker), "empty", "soi_eoi" (just the two markers),
    or None (a padded slot: empty, mask 0)."""
    good = jpegs[0]
    made = {"jpeg": good, "png": b"\x89PNG\r\n\x1a\n" + b"\0" * 100, "cut": good[:-2], "empty": b"",
            "tail10": good + b"\0" * 10, "tail100": good + b"\0" * 100, "soi_eoi": b"\xff\xd8\xff\xd9",
            "gif": b"GIF89a" + b"\0" * 50 + b"\xff\xd9"}
    images = [made[s] if s else b"" for s in spec] + [b""] * (4 - len(spec))
    mask = [1.0 if s else 0.0 for s in spec] + [0.0] * (4 - len(spec))
    return images, mask


def check(rows):
    images = tf.constant([r[0] for r in rows])
    mask = tf.constant([r[1] for r in rows], tf.float32)
    valid, error = export.check_slots(images, mask)
    return valid.numpy().tolist(), [e.decode() for e in error.numpy()]


CASES = [
    (["jpeg"], ""),
    (["jpeg", "jpeg", "jpeg", "jpeg"], ""),
    ([None, "jpeg", None, "jpeg"], ""),  # real slots need not come first
    (["tail10"], ""),  # bytes after the end marker, within the last 64: still whole
    (["soi_eoi"], ""),  # the markers are all it checks (decoding is the model's part)
    (["png"], "slot 0: " + NOT_JPEG),
    (["gif"], "slot 0: " + NOT_JPEG),
    (["empty"], "slot 0: " + NOT_JPEG),  # an empty string in a real slot
    (["jpeg", "cut"], "slot 1: " + TRUNCATED),
    (["tail100"], "slot 0: " + TRUNCATED),  # the end marker is looked for in the last 64 bytes only
    (["jpeg", "jpeg", "png", "cut"], "slot 2: " + NOT_JPEG),  # the first bad slot is named
    (["jpeg", "cut", "png"], "slot 1: " + TRUNCATED),
    ([None, None, None, None], "no image (every mask is 0)"),
    ([], "no image (every mask is 0)"),
]


@pytest.mark.parametrize("spec, error", CASES, ids=lambda x: str(x))
def test_check_slots(jpegs, spec, error):
    assert check([slots(jpegs, spec)]) == ([error == ""], [error])


def test_check_slots_ignores_what_is_in_a_padded_slot(jpegs):
    images, _ = slots(jpegs, ["jpeg", "png", "cut", "empty"])
    assert check([(images, [1.0, 0.0, 0.0, 0.0])]) == ([True], [""])
    assert check([(images, [0.0, 0.0, 1.0, 0.0])]) == ([False], ["slot 2: " + TRUNCATED])


def test_check_slots_answers_each_product_of_a_batch_alone(jpegs):
    valid, errors = check([slots(jpegs, spec) for spec, _ in CASES])
    assert errors == [error for _, error in CASES]
    assert valid == [error == "" for _, error in CASES]


CORRUPT = "corrupt JPEG (does not decode)"


@pytest.mark.parametrize("spec, decodes, error", [
    (["jpeg", "jpeg"], [True, True], ""),
    (["jpeg", "jpeg"], [True, False], "slot 1: " + CORRUPT),
    ([None, "jpeg"], [False, True], ""),  # a padded slot's decode does not count
    (["jpeg", "jpeg", "jpeg"], [True, False, False], "slot 1: " + CORRUPT),  # the first one named
    # A product with a bad marker is not decoded (serve passes True for its slots): the marker is named.
    (["jpeg", "png"], [True, True], "slot 1: " + NOT_JPEG),
    (["jpeg", "cut", "jpeg"], [True, True, True], "slot 1: " + TRUNCATED),
    ([], [False], "no image (every mask is 0)"),
], ids=str)
def test_check_slots_with_what_decodes(jpegs, spec, decodes, error):
    images, mask = slots(jpegs, spec)
    decodes = tf.constant([decodes + [True] * (4 - len(decodes))])
    valid, errors = export.check_slots(tf.constant([images]), tf.constant([mask]), decodes)
    assert (valid.numpy().tolist(), [e.decode() for e in errors.numpy()]) == ([error == ""], [error])


# ---------------------------------------------------------------------------------------------
# The SavedModel, in-process

NUM_CLASSES = 3
CATEGORY_IDS = [1000018296, 1000007138, 1000010653]
IMAGE_SIZE, CROP_SIZE = 40, 32


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
    """A tiny model whose category logits favour class 2, then 1, then 0 (its head's bias), exported
    with top_k=5 over its 3 classes, over a folder that held something else."""
    keras.utils.set_random_seed(0)
    model = build_model(ModelConfig(num_classes=NUM_CLASSES, image_size=CROP_SIZE, backbone="tiny", fusion="mean"))
    model.get_layer("category").bias.assign([0.0, 2.0, 4.0])
    labels = Labels(category_ids=np.array(CATEGORY_IDS, np.int64), level1=("",) * 3, level2=("",) * 3,
                    level3=("",) * 3, level1_index=np.zeros(3, np.int64), level2_index=np.zeros(3, np.int64),
                    level1_names=("",), level2_names=("/",))
    path = str(tmp_path_factory.mktemp("export") / "export")
    os.makedirs(path)
    with open(os.path.join(path, "stale.txt"), "w") as f:
        f.write("from an earlier export")
    export.export_serving_model(model, labels, path, image_size=IMAGE_SIZE, crop_size=CROP_SIZE, top_k=5)
    return model, path, tf.saved_model.load(path).signatures["serving_default"]


def test_export_replaces_the_folder_and_declares_the_signature(exported):
    _, path, serve = exported
    assert "stale.txt" not in os.listdir(path) and "saved_model.pb" in os.listdir(path)
    assert set(tf.saved_model.load(path).signatures) == {"serving_default", "serve", "serving_info"}
    _, inputs = serve.structured_input_signature
    assert inputs == {"images": tf.TensorSpec([None, 4], tf.string, name="images"),
                      "mask": tf.TensorSpec([None, 4], tf.float32, name="mask")}
    assert {name: (spec.dtype, spec.shape.as_list()) for name, spec in serve.structured_outputs.items()} == {
        "category_ids": (tf.int64, [None, 3]), "probabilities": (tf.float32, [None, 3]),
        "classes": (tf.int32, [None, 3]), "valid": (tf.bool, [None]), "error": (tf.string, [None])}


def test_serving_signature_on_real_jpeg_bytes(exported, jpegs):
    model, _, serve = exported
    specs = [["jpeg"], [None, "jpeg", "jpeg"], ["png"], ["jpeg", "cut"], []]
    rows = []
    for spec in specs:
        images, mask = slots(jpegs, spec)
        rows.append(([jpegs[i % 3] if image == jpegs[0] else image for i, image in enumerate(images)], mask))
    images = tf.constant([r[0] for r in rows])
    mask = tf.constant([r[1] for r in rows], tf.float32)
    out = {name: value.numpy() for name, value in serve(images=images, mask=mask).items()}

    assert out["valid"].tolist() == [True, True, False, False, False]
    assert [e.decode() for e in out["error"]] == ["", "", "slot 0: " + NOT_JPEG, "slot 1: " + TRUNCATED,
                                                 "no image (every mask is 0)"]
    # The valid products: every class, by probability (the head's bias orders them), as category ids.
    assert out["classes"][:2].tolist() == [[2, 1, 0]] * 2
    assert out["category_ids"][:2].tolist() == [[CATEGORY_IDS[2], CATEGORY_IDS[1], CATEGORY_IDS[0]]] * 2
    # Their probabilities are the model's on the evaluation decoding (resize to 40, centre 32).
    decoded = decode.decode_images(images[:2], mask[:2], IMAGE_SIZE, crop_size=CROP_SIZE)
    logits = model({"images": decoded, "mask": mask[:2]}, training=False)["category"]
    expected = np.sort(tf.nn.softmax(logits).numpy(), axis=1)[:, ::-1]
    np.testing.assert_allclose(out["probabilities"][:2], expected, rtol=1e-5)
    assert out["probabilities"][0, 0] > out["probabilities"][0, 1] > out["probabilities"][0, 2] > 0
    # The invalid ones: -1 and 0, nothing decoded.
    assert out["category_ids"][2:].tolist() == [[-1] * 3] * 3 and out["classes"][2:].tolist() == [[-1] * 3] * 3
    assert out["probabilities"][2:].tolist() == [[0.0] * 3] * 3


# ---------------------------------------------------------------------------------------------
# Flip TTA: the export answers what `evaluate.py --flip_tta` measures (issue 16, item 6)

FLIP_PRODUCTS = 16


def _spread_head(model, images, mask):
    """A head whose logits spread by a few units over these products: the initial network's are
    near-uniform, and top-k ties would make any ordering comparison meaningless."""
    head = model.get_layer("category")
    features = np.asarray(keras.Model(model.inputs, head.input)({"images": images, "mask": mask}))
    kernel = np.random.default_rng(1).normal(size=head.kernel.shape) * 4 / (features.std() * features.shape[1] ** 0.5)
    head.kernel.assign(kernel.astype(np.float32))
    head.bias.assign(-(features.mean(axis=0) @ kernel).astype(np.float32))


@pytest.fixture(scope="module")
def flip_exports(tmp_path_factory):
    """A data folder of the sample products, evaluate's batches of its first FLIP_PRODUCTS (the
    evaluation decoding), the JPEG slots of the same products, and one model exported without and
    with flip TTA."""
    data_dir = write_data_dir(str(tmp_path_factory.mktemp("flip_data")), with_val=False)
    labels = read_labels(data_dir)
    dataset = create_dataset(os.path.join(data_dir, record_schema.shard_pattern("train")), batch_size=8,
                             training=False, image_size=IMAGE_SIZE, crop_size=CROP_SIZE).take(FLIP_PRODUCTS // 8)
    keras.utils.set_random_seed(1)
    model = build_model(ModelConfig(num_classes=labels.num_classes, image_size=CROP_SIZE, backbone="tiny"))
    features, _ = next(iter(dataset))
    _spread_head(model, features["images"], features["mask"])
    documents = {d["_id"]: d for d in sample_documents()}
    product_ids = np.concatenate([f["product_id"].numpy() for f, _ in dataset])
    pictures = [[img["picture"] for img in documents[int(i)]["imgs"]] for i in product_ids]
    images = tf.constant([p + [b""] * (4 - len(p)) for p in pictures])
    mask = tf.constant([[1.0] * len(p) + [0.0] * (4 - len(p)) for p in pictures], tf.float32)
    served = {}
    for flip_tta in (False, True):
        path = str(tmp_path_factory.mktemp("export") / f"flip_{flip_tta}")
        export.export_serving_model(model, labels, path, image_size=IMAGE_SIZE, crop_size=CROP_SIZE, top_k=5,
                                    flip_tta=flip_tta)
        served[flip_tta] = tf.saved_model.load(path)
    return model, dataset, product_ids, images, mask, served


def _evaluate_top5(model, dataset, flip_tta):
    member = Member(model_dir="in memory", checkpoint="final", model=model,
                    config={"train": {"image_size": IMAGE_SIZE, "crop_size": CROP_SIZE}, "model": {}})
    return predict_top_k([member], [dataset], k=5, flip_tta=flip_tta, log=lambda *_: None)


@pytest.mark.parametrize("flip_tta", [False, True], ids=["plain", "flip_tta"])
def test_the_export_answers_as_evaluate_does(flip_exports, flip_tta):
    """The same products, through evaluate's pipeline and predict_top_k, and through the SavedModel's
    JPEG bytes: the same classes, the same probabilities to float tolerance."""
    model, dataset, product_ids, images, mask, served = flip_exports
    evaluated = _evaluate_top5(model, dataset, flip_tta)
    out = served[flip_tta].signatures["serving_default"](images=images, mask=mask)
    assert evaluated["product_id"].tolist() == product_ids.tolist()
    assert out["valid"].numpy().all()
    np.testing.assert_array_equal(out["classes"].numpy(), evaluated["top_classes"])
    np.testing.assert_allclose(out["probabilities"].numpy(), evaluated["top_probabilities"], rtol=1e-5, atol=1e-7)


def test_flip_tta_changes_the_answer(flip_exports):
    """Else the test above could not tell a flip-TTA export from a plain one: the mirror moves the
    probabilities of this model by far more than the tolerance."""
    model, dataset, _, images, mask, served = flip_exports
    plain, flipped = (_evaluate_top5(model, dataset, flip)["top_probabilities"] for flip in (False, True))
    assert np.abs(plain - flipped).max() > 1e-3
    served_plain, served_flipped = (served[flip].signatures["serving_default"](images=images, mask=mask)
                                    ["probabilities"].numpy() for flip in (False, True))
    assert np.abs(served_plain - served_flipped).max() > 1e-3


def test_serving_info_says_what_the_export_does(flip_exports):
    *_, served = flip_exports
    for flip_tta in (False, True):
        info = {name: value.numpy().item() for name, value in served[flip_tta].signatures["serving_info"]().items()}
        assert info == {"flip_tta": flip_tta, "image_size": IMAGE_SIZE, "crop_size": CROP_SIZE}
