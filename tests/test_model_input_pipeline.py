"""model.input_pipeline on records made from the real JPEGs of data/train_example.bson.

Reference pixels come from Pillow (independent decoder) and from `decode_image` (to check that a
crop is exactly a window of the right picture, never mirrored, which also proves that images stay
with their product through the nondeterministic parallel stages). The random mirror is the
model's (tests/test_model_network.py); the pipeline must not mirror.
"""

import io
import os

import bson
import numpy as np
import pytest
import tensorflow as tf
from PIL import Image

import record_schema
from model.input_pipeline import dataset as ip
from model.input_pipeline import decode
from model.input_pipeline.sources import StreamStart

SIZE = 180


@pytest.fixture(scope="module")
def products(sample_bson):
    """[(product_id, category_id, label, [jpeg, ...])] in BSON order."""
    with open(sample_bson, "rb") as f:
        docs = list(bson.decode_file_iter(f))
    categories = {c: i for i, c in enumerate(sorted({d["category_id"] for d in docs}))}
    return [(d["_id"], d["category_id"], categories[d["category_id"]], [im["picture"] for im in d["imgs"]])
            for d in docs]


def _write(path, products, labelled=True):
    with tf.io.TFRecordWriter(str(path)) as writer:
        for pid, category, label, jpegs in products:
            if labelled:
                writer.write(record_schema.encode_example(pid, category, label, jpegs))
            else:
                writer.write(record_schema.encode_example(pid, record_schema.UNLABELLED,
                                                          record_schema.UNLABELLED, jpegs))


@pytest.fixture(scope="module")
def data(tmp_path_factory, products):
    """Three labelled shards of uneven size (30 + 30 + 22 products), one single-file split and
    one unlabelled shard."""
    root = tmp_path_factory.mktemp("records")
    for i, (lo, hi) in enumerate([(0, 30), (30, 60), (60, len(products))]):
        _write(root / record_schema.shard_name("train", i, 3), products[lo:hi])
    _write(root / record_schema.shard_name("single", 0, 1), products)
    _write(root / record_schema.shard_name("test", 0, 1), products[:10], labelled=False)
    return {
        "train": str(root / record_schema.shard_pattern("train")),
        "single": str(root / record_schema.shard_pattern("single")),
        "test": str(root / record_schema.shard_pattern("test")),
    }


@pytest.fixture(scope="module")
def reference(products):
    """product_id -> uint8 [n, 180, 180, 3] decoded by Pillow."""
    return {pid: np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB")) for j in jpegs])
            for pid, _, _, jpegs in products}


def _collect(ds):
    """Concatenated numpy arrays of a finite dataset."""
    out = {"images": [], "mask": [], "product_id": [], "label": []}
    for features, label in ds:
        for key in ("images", "mask", "product_id"):
            out[key].append(features[key].numpy())
        out["label"].append(label.numpy())
    return {k: np.concatenate(v) for k, v in out.items()}


def _assert_padded_zero(images, mask):
    assert not images[mask == 0].any(), "padded slots must be exact zeros"


def test_eval_shapes_order_pixels(data, products, reference):
    ds = ip.create_dataset(data["train"], batch_size=16, training=False)
    spec_features, spec_label = ds.element_spec
    assert spec_features["images"].shape.as_list() == [None, 4, SIZE, SIZE, 3]
    assert spec_features["images"].dtype == tf.uint8 and spec_features["mask"].dtype == tf.float32
    assert spec_features["product_id"].dtype == tf.int64 and spec_label.dtype == tf.int64

    batches = [b for b in ds]
    assert [int(f["images"].shape[0]) for f, _ in batches] == [16] * 5 + [2]  # 82 = 5 x 16 + 2
    got = _collect(batches)
    # Every record, in file order then record order, across the three files.
    assert got["product_id"].tolist() == [p[0] for p in products]
    assert got["label"].tolist() == [p[2] for p in products]
    assert got["mask"].tolist() == [[1.0] * len(p[3]) + [0.0] * (4 - len(p[3])) for p in products]
    _assert_padded_zero(got["images"], got["mask"])
    for i, (pid, _, _, jpegs) in enumerate(products):
        decoded = got["images"][i, :len(jpegs)].astype(int)
        diff = np.abs(decoded - reference[pid].astype(int))
        # INTEGER_ACCURATE is libjpeg's ISLOW like Pillow: identical here, allow decoder drift.
        assert diff.mean() < 1.0 and diff.max() <= 8, (pid, diff.mean(), diff.max())


def test_a_data_folder_is_read_with_the_slot_count_of_its_metadata(tmp_path, products):
    """A conversion with --max_images=2 (issue 28): split_dataset takes the slots from
    metadata.json, which parse_example with the default 4 refused."""
    import json

    from model.config import ImageSpec
    from model.input_pipeline import data_folder

    with tf.io.TFRecordWriter(str(tmp_path / record_schema.shard_name("val", 0, 1))) as writer:
        for pid, category, label, jpegs in products[:10]:
            writer.write(record_schema.encode_example(pid, category, label, jpegs[:2], max_images=2))
    (tmp_path / record_schema.METADATA_FILE).write_text(json.dumps({"max_images": 2}))
    got = _collect(data_folder.split_dataset(str(tmp_path), "val", ImageSpec(32), training=False, batch_size=4))
    assert data_folder.max_images(str(tmp_path)) == 2
    assert got["mask"].tolist() == [[1.0] * min(2, len(p[3])) + [0.0] * (2 - min(2, len(p[3]))) for p in products[:10]]
    assert got["images"].shape == (10, 2, 32, 32, 3)


def test_unlabelled_records(data):
    got = _collect(ip.create_dataset(data["test"], batch_size=4, training=False))
    assert len(got["label"]) == 10 and (got["label"] == -1).all()


def test_no_matching_file(tmp_path):
    pattern = str(tmp_path / "nothing-*.tfrecord")
    with pytest.raises(FileNotFoundError, match="nothing-"):
        ip.create_dataset(pattern, batch_size=4, training=True)


def test_a_pipeline_whose_share_is_only_empty_files_reads_the_others(tmp_path, products):
    """Two pipelines (workers) over four shards, two of them empty: by file, pipeline 0 would get
    only the empty ones and repeat nothing forever (issue 20: a hang at step 1, at 128% CPU)."""
    for i in range(4):
        _write(tmp_path / record_schema.shard_name("train", i, 4), products[:20] if i % 2 else [])
    pattern = str(tmp_path / record_schema.shard_pattern("train"))
    for pipeline_id in (0, 1):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline_id)
        ds = ip.create_dataset(pattern, batch_size=4, training=True, image_size=32, seed=1, repeat=True,
                               input_context=context)
        ids = np.concatenate([features["product_id"].numpy() for features, _ in ds.take(10)])
        assert len(ids) == 40 and set(ids) <= {pid for pid, *_ in products[:20]}
    for i in (1, 3):
        os.remove(tmp_path / record_schema.shard_name("train", i, 4))
    with pytest.raises(ValueError, match="is empty: nothing to repeat"):
        ip.create_dataset(pattern, batch_size=4, training=True, repeat=True)


def test_bad_arguments(data):
    with pytest.raises(ValueError, match="crop must be in 1..size"):
        ip.create_dataset(data["train"], batch_size=4, training=True, crop_size=200)
    with pytest.raises(ValueError, match="batch_size"):
        ip.create_dataset(data["train"], batch_size=0, training=False)


# ---------------------------------------------------------------------------------------------
# The pure pieces, eagerly and inside tf.data


def _serialized(products):
    return [record_schema.encode_example(pid, c, label, jpegs) for pid, c, label, jpegs in products]


def test_parse_batch(products):
    batch = products[:6]
    eager = decode.parse_batch(tf.constant(_serialized(batch)))
    graph = next(iter(tf.data.Dataset.from_tensor_slices(_serialized(batch)).batch(6).map(decode.parse_batch)))
    for parsed in (eager, graph):
        assert parsed["product_id"].numpy().tolist() == [p[0] for p in batch]
        assert parsed["label"].numpy().tolist() == [p[2] for p in batch]
        assert parsed["mask"].dtype == tf.float32 and parsed["mask"].shape == (6, 4)
        assert parsed["images"].shape == (6, 4)
        assert parsed["images"][0, 0].numpy() == batch[0][3][0]


def test_a_mask_with_holes_decodes_slot_by_slot(products, reference):
    # Records put real images first (docs/FORMATS.md section 2), but the decoder does not rely on it.
    pid, _, _, jpegs = products[0]
    example = tf.train.Example(features=tf.train.Features(feature={
        "product_id": tf.train.Feature(int64_list=tf.train.Int64List(value=[pid])),
        "category_id": tf.train.Feature(int64_list=tf.train.Int64List(value=[2])),
        "label": tf.train.Feature(int64_list=tf.train.Int64List(value=[0])),
        "images": tf.train.Feature(bytes_list=tf.train.BytesList(value=[b"", jpegs[0], b"", b""])),
        "mask": tf.train.Feature(int64_list=tf.train.Int64List(value=[0, 1, 0, 0])),
    })).SerializeToString()
    parsed = decode.parse_batch(tf.constant([example]))
    decoded = decode.decode_images(parsed["images"], parsed["mask"], SIZE).numpy()
    assert not decoded[0, [0, 2, 3]].any()
    np.testing.assert_array_equal(decoded[0, 1], reference[pid][0])


def test_decode_images_eager_and_in_tf_data(products, reference):
    # The first product of each image count, then single-image ones.
    batch = [next(p for p in products if len(p[3]) == n) for n in (1, 2, 3, 4)] + products[1:5]
    images = tf.constant([p[3] + [b""] * (4 - len(p[3])) for p in batch])
    mask = tf.constant([[1.0] * len(p[3]) + [0.0] * (4 - len(p[3])) for p in batch])

    eager = decode.decode_images(images, mask, SIZE).numpy()
    assert eager.shape == (8, 4, SIZE, SIZE, 3) and eager.dtype == np.uint8
    in_data = next(iter(tf.data.Dataset.from_tensors((images, mask)).map(
        lambda i, m: decode.decode_images(i, m, SIZE)))).numpy()
    np.testing.assert_array_equal(eager, in_data)
    _assert_padded_zero(eager, mask.numpy())
    for i, (pid, _, _, jpegs) in enumerate(batch):
        assert np.abs(eager[i, :len(jpegs)].astype(int) - reference[pid]).mean() < 1.0

    # One product ([M] slots) works too; a crop_size gives the centre window.
    single = decode.decode_images(images[0], mask[0], SIZE, crop_size=160).numpy()
    assert single.shape == (4, 160, 160, 3) and not single[1:].any()
    np.testing.assert_array_equal(single[0], eager[0, 0, 10:170, 10:170])
    # Another size: right shape, same picture. At 90 px, libjpeg's 1/2 scaled decode, which is
    # close to a 2x2 box average (Pillow's BOX filter: a mean difference of 0.8 over the 110
    # sample pictures; its antialiased BILINEAR, a wider triangle, 3.0).
    small = decode.decode_images(images[:1], mask[:1], 90).numpy()
    assert small.shape == (1, 4, 90, 90, 3)
    pil = np.asarray(Image.open(io.BytesIO(batch[0][3][0])).convert("RGB").resize((90, 90), Image.BOX))
    assert np.abs(small[0, 0].astype(int) - pil).mean() < 2


def test_decode_image_recovers_a_truncated_jpeg(products):
    jpeg = products[0][3][0]
    image = decode.decode_image(jpeg[: int(len(jpeg) * 0.8)], SIZE)
    assert image.shape == (SIZE, SIZE, 3)
    with pytest.raises(tf.errors.InvalidArgumentError):
        decode.decode_image(b"not a picture at all", SIZE)


def _window_of(image, full):
    """(top, left, mirrored) such that `image` is that window of `full`, maybe mirrored; else None."""
    c = image.shape[0]
    for mirrored in (False, True):
        upright = image[:, ::-1] if mirrored else image
        # Candidates from the first row only (cheap), then the whole window.
        rows = np.lib.stride_tricks.sliding_window_view(full[: full.shape[0] - c + 1], upright.shape[1:], axis=(1, 2))
        for top, left in zip(*np.nonzero((rows[:, :, 0] == upright[0]).all(axis=(-2, -1)))):
            if np.array_equal(full[top:top + c, left:left + c], upright):
                return int(top), int(left), mirrored
    return None


def _slots(batch):
    """string [B, 4] JPEG slots and float32 [B, 4] mask of products, real images first."""
    images = tf.constant([p[3] + [b""] * (4 - len(p[3])) for p in batch])
    mask = tf.constant([[1.0] * len(p[3]) + [0.0] * (4 - len(p[3])) for p in batch])
    return images, mask


@pytest.mark.parametrize("size,crop", [(SIZE, 160), (48, 40)], ids=["180_crop160", "48_crop40"])
def test_random_crops_eager_and_in_tf_data(products, size, crop):
    """Each real slot is the crop window at its drawn offset of its own picture at image_size,
    never mirrored; padded slots stay zero. 48 px: the crop follows the batched resize."""
    batch = [next(p for p in products if len(p[3]) == n) for n in (1, 2, 3, 4)] + products[1:5]
    images, mask = _slots(batch)
    full = decode.decode_images(images, mask, size).numpy()
    seed = tf.constant([3, 4], tf.int64)
    offset = decode.random_offsets(seed, tf.shape(mask), image_size=size, crop_size=crop)
    assert offset.shape == (8, 4, 2) and offset.dtype == tf.int32

    cropped = decode.decode_images(images, mask, size, crop_size=crop, offset=offset).numpy()
    again = next(iter(tf.data.Dataset.from_tensors((images, mask, offset)).map(
        lambda i, m, o: decode.decode_images(i, m, size, crop_size=crop, offset=o)))).numpy()
    np.testing.assert_array_equal(cropped, again)  # pure: same offsets, same pixels, eager or not
    assert cropped.shape == (8, 4, crop, crop, 3)
    _assert_padded_zero(cropped, mask.numpy())
    real = mask.numpy() > 0
    for b, m in zip(*np.nonzero(real)):
        top, left = offset[b, m].numpy()
        np.testing.assert_array_equal(cropped[b, m], full[b, m, top:top + crop, left:left + crop])
    assert len({tuple(o) for o in offset.numpy()[real]}) > 5  # offsets vary from image to image
    other = decode.random_offsets(seed + 1, tf.shape(mask), image_size=size, crop_size=crop)
    assert not np.array_equal(cropped, decode.decode_images(images, mask, size, crop_size=crop, offset=other).numpy())


def test_dct_ratio_is_the_largest_that_keeps_the_side():
    # libjpeg decodes a 180 px picture to ceil(180 / ratio): 180, 90, 45, 23 px.
    expected = {180: 1, 160: 1, 91: 1, 90: 2, 64: 2, 48: 2, 46: 2, 45: 4, 32: 4, 23: 8, 16: 8}
    assert {size: decode.dct_ratio(size) for size in expected} == expected
    assert decode.dct_ratio(100, stored_size=400) == 4


@pytest.fixture(scope="module")
def jpegs(products):
    return [j for _, _, _, pictures in products for j in pictures]  # the 110 real pictures


@pytest.mark.parametrize("size", [90, 64, 48, 45, 32])
def test_dct_scaled_decode_is_close_to_decode_then_resize(jpegs, size):
    """decode_image at a small size (a DCT-scaled decode, then a plain bilinear resize of less
    than 2x, or none at 90 and 45 px) against the previous pixels: a full decode, then an
    antialiased resize.

    Tolerance: mean absolute difference <= 5 levels over the 110 pictures and <= 10 for any one
    of them (measured: 3.0 and 6.3 at 90 px, 4.2 and 8.9 at 48 px, 3.1 and 6.7 at 45 px; the
    differences are at edges, the scaled decode being a sharper, box-like filter than the
    antialiased triangle). And neither blurred nor aliased: against Pillow's Lanczos resize of
    the full picture (a high-quality reference) at most 1 level further than the previous pixels
    (measured: 0.6 closer at 90 px, 0.6 further at 48 px, 0.4 at 32 px), where a plain bilinear
    shrink of the full decode is 2-6 levels further, but at exactly 2x (90 px)."""
    ours = np.stack([decode.decode_image(j, size).numpy() for j in jpegs]).astype(int)
    full = [tf.io.decode_jpeg(j, channels=3, dct_method="INTEGER_ACCURATE") for j in jpegs]
    previous = np.stack([tf.round(tf.image.resize(f, [size, size], antialias=True)).numpy() for f in full])
    per_picture = np.abs(ours - previous).reshape(len(jpegs), -1).mean(1)
    assert per_picture.mean() <= 5 and per_picture.max() <= 10, (per_picture.mean(), per_picture.max())

    lanczos = np.stack([np.asarray(Image.open(io.BytesIO(j)).convert("RGB").resize((size, size), Image.LANCZOS))
                        for j in jpegs]).astype(int)
    aliased = np.stack([tf.round(tf.image.resize(f, [size, size])).numpy() for f in full])
    ours_off, previous_off = np.abs(ours - lanczos).mean(), np.abs(previous - lanczos).mean()
    assert ours_off <= previous_off + 1, (ours_off, previous_off)
    if size != SIZE // 2:  # (at exactly 2x a plain bilinear shrink is a 2x2 average: no aliasing)
        assert previous_off + 1 < np.abs(aliased - lanczos).mean()  # the measure sees aliasing

    # It is the DCT-scaled decode (1/2 at 46-90 px, 1/4 at 23-45 px), resized only when needed.
    scaled = tf.io.decode_jpeg(jpegs[0], channels=3, ratio=decode.dct_ratio(size), dct_method="INTEGER_ACCURATE")
    if scaled.shape[0] != size:
        scaled = tf.round(tf.image.resize(scaled, [size, size], method="bilinear"))
    np.testing.assert_array_equal(ours[0], scaled.numpy())


@pytest.mark.parametrize("size,crop", [(48, None), (90, None), (48, 40), (SIZE, 160)])
def test_training_evaluation_and_serving_see_the_same_pixels(data, products, size, crop):
    """One decode for all. The serving signature's decode (the call model/export.py makes, in a
    tf.function of the export's input signature) gives exactly the evaluation pipeline's images,
    which are `decode_image`'s pictures (centre-cropped); the training pipeline gives those very
    pictures too (without a crop), or upright windows of them."""
    side = crop or size
    evaluation = _collect(ip.create_dataset(data["single"], batch_size=16, training=False,
                                            image_size=size, crop_size=crop))
    serve = tf.function(lambda i, m: decode.decode_images(i, m, size, crop_size=crop), input_signature=[
        tf.TensorSpec([None, 4], tf.string), tf.TensorSpec([None, 4], tf.float32)])
    np.testing.assert_array_equal(serve(*_slots(products)).numpy(), evaluation["images"])

    pictures = {pid: [decode.decode_image(j, size).numpy() for j in jpegs] for pid, _, _, jpegs in products}
    top = (size - side) // 2
    for i, (pid, _, _, jpegs) in enumerate(products):
        for m in range(len(jpegs)):
            np.testing.assert_array_equal(evaluation["images"][i, m], pictures[pid][m][top:top + side, top:top + side])

    training = _collect(ip.create_dataset(data["train"], batch_size=8, training=True,
                                          image_size=size, crop_size=crop, shuffle_buffer=64))
    _assert_padded_zero(training["images"], training["mask"])
    for images, mask, pid in zip(training["images"], training["mask"], training["product_id"]):
        for m in range(int(mask.sum())):
            if crop is None:
                np.testing.assert_array_equal(images[m], pictures[pid][m])
            else:
                window = _window_of(images[m], pictures[pid][m])
                assert window is not None and not window[2], (pid, m)


def _encode(picture: np.ndarray) -> bytes:
    out = io.BytesIO()
    Image.fromarray(picture).save(out, "JPEG", quality=95)
    return out.getvalue()


@pytest.mark.parametrize("size,crop", [(SIZE, None), (SIZE, 160), (90, None), (48, None), (48, 40)])
def test_pictures_of_other_sizes_come_out_right(products, size, crop):
    """Cdiscount's pictures are 180 px; any other size is decoded in full and resized with
    antialiasing: right shape, right picture, and it does not disturb the other pictures of its
    batch (which leaves the batch's fast path for the image-by-image one)."""
    picture = np.asarray(Image.open(io.BytesIO(products[0][3][0])).convert("RGB"))
    odd = {(360, 360): None, (120, 200): None, (60, 60): None}
    for (h, w) in odd:
        odd[h, w] = _encode(np.asarray(Image.fromarray(picture).resize((w, h), Image.LANCZOS)))
    for (h, w), jpeg in odd.items():
        image = decode.decode_image(jpeg, size).numpy()
        assert image.shape == (size, size, 3)
        reference = np.asarray(Image.open(io.BytesIO(jpeg)).convert("RGB").resize((size, size), Image.BILINEAR))
        assert np.abs(image.astype(int) - reference).mean() < 2, (h, w)

    batch = products[:6]
    images, mask = _slots(batch)
    side = crop or size
    offset = None if crop is None else decode.random_offsets(tf.constant([5, 6], tf.int64), tf.shape(mask),
                                                         image_size=size, crop_size=crop)
    standard = decode.decode_images(images, mask, size, crop_size=crop, offset=offset).numpy()
    holes = [(b, m) for b, m in zip(*np.nonzero(mask.numpy() == 0))][:3]  # put the odd ones there
    mixed_images, mixed_mask = images.numpy(), mask.numpy()
    for (b, m), jpeg in zip(holes, odd.values()):
        mixed_images[b, m], mixed_mask[b, m] = jpeg, 1.0
    mixed = decode.decode_images(mixed_images, mixed_mask, size, crop_size=crop, offset=offset).numpy()
    assert mixed.shape == (6, 4, side, side, 3)
    real = mask.numpy() > 0
    np.testing.assert_array_equal(mixed[real], standard[real])
    for (b, m), jpeg in zip(holes, odd.values()):
        top, left = (0, 0) if crop is None else offset[b, m].numpy()
        whole = decode.decode_image(jpeg, size).numpy()
        np.testing.assert_array_equal(mixed[b, m], whole[top:top + side, left:left + side])
    _assert_padded_zero(mixed, mixed_mask)


# ---------------------------------------------------------------------------------------------
# Training mode


def test_training_batches_crop_real_images_only_and_never_mirror(data, products):
    full = {pid: [decode.decode_image(j, SIZE).numpy() for j in jpegs] for pid, _, _, jpegs in products}
    ds = ip.create_dataset(data["train"], batch_size=8, training=True, crop_size=160, shuffle_buffer=64)
    assert ds.element_spec[0]["images"].shape.as_list() == [8, 4, 160, 160, 3]  # static batch
    got = _collect(ds)
    assert len(got["product_id"]) == 80  # 82 products, short last batch dropped
    _assert_padded_zero(got["images"], got["mask"])
    mirrored, offsets = 0, set()
    for images, mask, pid in zip(got["images"], got["mask"], got["product_id"]):
        n = int(mask.sum())
        assert n == sum(1 for p in products if p[0] == pid for _ in p[3])
        for slot in range(n):
            window = _window_of(images[slot], full[pid][slot])
            assert window is not None, f"product {pid} slot {slot} is not a window of its own picture"
            mirrored += window[2]
            offsets.add(window[:2])
    # The mirror is the model's now (ModelConfig.flip): the host hands over upright crops.
    assert mirrored == 0 and len(offsets) > 5


def test_training_shuffles_every_record_once(data, products):
    ds = ip.create_dataset(data["train"], batch_size=2, training=True, shuffle_buffer=32)
    first = _collect(ds)["product_id"].tolist()
    second = _collect(ds)["product_id"].tolist()  # a new epoch is a new order
    ids = [p[0] for p in products]
    assert sorted(first) == sorted(ids) == sorted(second)  # 82 = 41 batches of 2: nothing dropped
    assert first != ids and first != second


def test_seed_makes_training_reproducible(data):
    def run(seed):
        ds = ip.create_dataset(data["train"], batch_size=8, training=True, seed=seed, shuffle_buffer=64)
        return _collect(ds.take(3))

    a, b, c = run(7), run(7), run(8)
    np.testing.assert_array_equal(a["product_id"], b["product_id"])
    np.testing.assert_array_equal(a["images"], b["images"])
    assert not np.array_equal(a["product_id"], c["product_id"])


COUNTS = (30, 30, 22)  # the records of data["train"]'s three files


def _counts(pattern):
    return dict(zip(sorted(tf.io.gfile.glob(pattern)), COUNTS))


def _batches(pattern, start, count, **options):
    ds = ip.create_dataset(pattern, batch_size=5, training=True, image_size=40, crop_size=32, seed=7,
                           shuffle_buffer=16, repeat=True, start=StreamStart(start, _counts(pattern)), **options)
    return [(f["product_id"].numpy().tolist(), f["images"].numpy()) for f, _ in ds.take(count)]


@pytest.mark.parametrize("start", [1, 16, 17, 33])  # 82 records a pass: batch 16 ends pass 1 (80 records), 33 is in pass 3
def test_a_seeded_stream_started_at_a_batch_is_the_stream_from_there(data, start):
    """The same products in the same order, and the same crops, as the stream begun at 0."""
    whole = _batches(data["train"], 0, 40)
    later = _batches(data["train"], start, 40 - start)
    assert [ids for ids, _ in later] == [ids for ids, _ in whole[start:]]
    for (_, images), (_, expected) in zip(later, whole[start:]):
        np.testing.assert_array_equal(images, expected)


def test_each_pass_of_a_seeded_stream_is_every_record_once_in_a_new_order(data, products):
    ids = sum((ids for ids, _ in _batches(data["train"], 0, 32)), [])  # 160 records: passes of 82
    first, second = ids[:82], ids[82:160]
    assert sorted(first) == sorted(p[0] for p in products) and first != [p[0] for p in products]
    assert len(set(second)) == len(second) and second != first[:78]


def test_a_start_batch_shares_records_between_pipelines_as_the_reader_does(data):
    """1 file for 2 pipelines: each reads every other record, so a pass is 41 and 41 records."""
    for pipeline in (0, 1):
        context = tf.distribute.InputContext(num_input_pipelines=2, input_pipeline_id=pipeline, num_replicas_in_sync=2)
        counts = {path: 82 for path in tf.io.gfile.glob(data["single"])}

        def stream(start):
            ds = ip.create_dataset(data["single"], batch_size=4, training=True, image_size=40, seed=5,
                                   shuffle_buffer=8, repeat=True, input_context=context,
                                   start=StreamStart(start, counts))
            return [f["product_id"].numpy().tolist() for f, _ in ds.take(30 - start)]

        assert stream(11) == stream(0)[11:]  # batch 11 holds records 44..47: pass 2, after its 3rd


@pytest.mark.parametrize("options, records_per_file, message", [
    ({"training": False, "seed": 1}, None, "needs a seeded training stream"),
    ({"training": True, "seed": None}, None, "needs a seeded training stream"),
    ({"training": True, "seed": 1}, {}, "needs the records of every file"),
])
def test_a_start_batch_needs_a_seeded_training_stream_and_the_counts(data, options, records_per_file, message):
    with pytest.raises(ValueError, match=message):
        ip.create_dataset(data["train"], batch_size=4, start=StreamStart(3, records_per_file), **options)


# ---------------------------------------------------------------------------------------------
# Distribution


@pytest.mark.parametrize("split,pipelines,training", [
    ("train", 2, False), ("train", 4, False), ("single", 2, False),  # files; records; records
    ("train", 2, True), ("single", 2, True),  # the same under shuffling and parallel reads
])
def test_input_context_shards_without_overlap(data, products, split, pipelines, training):
    """3 files / 2 pipelines: whole files; 1 file / 2 and 3 files / 4 pipelines: every n-th record."""
    shares = []
    for i in range(pipelines):
        context = tf.distribute.InputContext(num_input_pipelines=pipelines, input_pipeline_id=i,
                                             num_replicas_in_sync=pipelines)
        ds = ip.create_dataset(data[split], batch_size=1, training=training, input_context=context)
        shares.append(_collect(ds)["product_id"].tolist())
    assert all(shares)
    assert sorted(sum(shares, [])) == sorted(p[0] for p in products)  # disjoint and complete


def test_mirrored_strategy(data):
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    global_batch = 8
    dist = strategy.distribute_datasets_from_function(lambda ctx: ip.create_dataset(
        data["train"], batch_size=ctx.get_per_replica_batch_size(global_batch), training=True,
        input_context=ctx, repeat=True, crop_size=160))

    @tf.function
    def step(features, label):
        def replica(features, label):
            real = tf.reduce_sum(features["mask"])
            return real, tf.shape(features["images"])[0], tf.reduce_sum(tf.cast(label >= 0, tf.int32))
        real, size, labelled = strategy.run(replica, args=(features, label))
        return (strategy.reduce("SUM", real, axis=None), strategy.reduce("SUM", size, axis=None),
                strategy.reduce("SUM", labelled, axis=None))

    iterator = iter(dist)
    for _ in range(3):
        features, label = next(iterator)
        per_replica = strategy.experimental_local_results(features["images"])
        assert [tuple(t.shape) for t in per_replica] == [(4, 4, 160, 160, 3)] * 2
        real, size, labelled = step(features, label)
        assert int(size) == global_batch == int(labelled) and global_batch <= float(real) <= 4 * global_batch


def test_the_contract_s_image_size_and_crop_size_give_the_side(data):
    """../shared/CONTRACT.md section 3 spells the side `image_size` (docs/FORMATS.md section 3)."""
    features, _ = next(iter(ip.create_dataset(data["single"], batch_size=2, training=False, image_size=40)))
    assert features["images"].shape[2:] == (40, 40, 3)
    features, _ = next(iter(ip.create_dataset(data["single"], batch_size=2, training=False, image_size=40, crop_size=24)))
    assert features["images"].shape[2:] == (24, 24, 3)
