"""python -m model.predict (model/commands/predict.py): products from JPEG files through the SavedModel
(issue 16, item 5).

A model_dir made in-process: a tiny network with a head that spreads its logits over the sample
products, exported as export/ (plain, top 5) and export_best/ (flip TTA, top 3), beside labels.csv
of a data folder of the 82 real products. Its answers are checked against the Keras model on the
evaluation decoding; each error case of the issue (a non-JPEG file, a missing file, more than 4
files, a model_dir without the export, --top_k above the export's k) in-process through `run`, and
the command as a user types it in a subprocess. The command on what train.py exported is in
test_model_training_run.py (the trainer's campaign)."""

import io
import json
import os
import shutil
import subprocess
import sys

import numpy as np
import pytest
import tensorflow as tf

import record_schema
from model import export
from model.commands import predict
from model.errors import UserError
from model.input_pipeline import decode
from model.input_pipeline.labels import read_labels
from model.model_dir import RunFolder
from tests.record_helpers import REPO, sample_documents
from tests.serving_helpers import spread_tiny_model

IMAGE_SIZE, CROP_SIZE = 36, 32
NOT_JPEG = "not a JPEG (no FF D8 FF start)"
TRUNCATED = "truncated JPEG (no FF D9 end marker)"


@pytest.fixture(scope="module")
def pictures(tmp_path_factory):
    """Files of 8 sample products (1, 4, 2, 3, then 1 pictures): product i's pictures are
    p{i}_{j}.jpg; and a PNG (x.png) and a JPEG cut before its end marker (cut.jpg)."""
    folder = tmp_path_factory.mktemp("pictures")
    products = []
    documents = sample_documents()
    for i, document in enumerate(documents[n] for n in (0, 12, 17, 35, 1, 2, 3, 4)):
        files = []
        for j, image in enumerate(document["imgs"]):
            files.append(str(folder / f"p{i}_{j}.jpg"))
            with open(files[-1], "wb") as f:
                f.write(image["picture"])
        products.append(files)
    with open(folder / "x.png", "wb") as f:
        f.write(b"\x89PNG\r\n\x1a\n" + b"\0" * 100)
    with open(folder / "cut.jpg", "wb") as f:
        f.write(sample_documents()[0]["imgs"][0]["picture"][:-2])
    return {"products": products, "png": str(folder / "x.png"), "cut": str(folder / "cut.jpg"), "folder": folder}


def _batch(products):
    """Lists of files -> (JPEG slots, mask) as the SavedModel takes them."""
    pictures = [[open(name, "rb").read() for name in files] for files in products]
    images = np.array([p + [b""] * (4 - len(p)) for p in pictures], dtype=object)
    mask = np.array([[1.0] * len(p) + [0.0] * (4 - len(p)) for p in pictures], np.float32)
    return images, mask


@pytest.fixture(scope="module")
def trained(tmp_path_factory, pictures):
    """(model_dir, the Keras model, labels): export/ plain with k=5, export_best/ flip TTA with k=3."""
    data_dir = str(tmp_path_factory.mktemp("data"))
    model, labels = spread_tiny_model(data_dir, *_batch(pictures["products"]), image_size=IMAGE_SIZE,
                                      crop_size=CROP_SIZE)

    model_dir = str(tmp_path_factory.mktemp("model"))
    shutil.copy(os.path.join(data_dir, record_schema.LABELS_FILE), model_dir)
    for checkpoint, flip_tta, top_k in (("final", False, 5), ("best", True, 3)):
        export.export_serving_model(model, labels, RunFolder(model_dir).export(checkpoint),
                                    image_size=IMAGE_SIZE, crop_size=CROP_SIZE, top_k=top_k, flip_tta=flip_tta)
    return model_dir, model, labels


def expected(trained, files, k, flip_tta=False):
    """The Keras model's top k on the evaluation decoding of these files, as predict prints them."""
    _, model, labels = trained
    images, mask = _batch([files])
    mask = tf.constant(mask)
    decoded = decode.decode_images(images, mask, IMAGE_SIZE, crop_size=CROP_SIZE)
    probabilities = tf.nn.softmax(model({"images": decoded, "mask": mask}, training=False)["category"]).numpy()
    if flip_tta:
        mirrored = model({"images": tf.reverse(decoded, axis=[3]), "mask": mask}, training=False)["category"]
        probabilities = (probabilities + tf.nn.softmax(mirrored).numpy()) / 2
    order = np.argsort(-probabilities[0])[:k]
    return [{"category_id": int(labels.category_ids[c]), "name": labels.level3[c],
             "probability": float(probabilities[0, c])} for c in order]


def run_json(model_dir, products, **options):
    """run() with --json in-process -> (exit status, the parsed lines)."""
    out = io.StringIO()
    status = predict.run(model_dir, [",".join(p) for p in products], as_json=True, out=out, **options)
    return status, [json.loads(line) for line in out.getvalue().splitlines()]


def assert_top(answer, want):
    assert list(answer) == ["files", "top"]
    assert [(row["category_id"], row["name"]) for row in answer["top"]] == [
        (row["category_id"], row["name"]) for row in want]
    np.testing.assert_allclose([row["probability"] for row in answer["top"]],
                               [row["probability"] for row in want], rtol=1e-5, atol=1e-7)


def test_each_product_gets_the_models_top_5_with_names(trained, pictures):
    products = [pictures["products"][i] for i in (0, 1, 2, 3)]
    assert [len(p) for p in products] == [1, 4, 2, 3]
    status, answers = run_json(trained[0], products)
    assert status == 0
    assert [a["files"] for a in answers] == products  # in the order given, as given
    for files, answer in zip(products, answers):
        assert_top(answer, expected(trained, files, 5))
        assert all(isinstance(row["name"], str) and row["name"] for row in answer["top"])
    # The answers depend on the pictures, so the equalities say something.
    assert answers[0]["top"][0]["probability"] != pytest.approx(answers[1]["top"][0]["probability"], rel=1e-3)


def test_a_product_that_cannot_be_answered_fails_alone(trained, pictures):
    """A non-JPEG file, a JPEG without its end, a missing file, five files, an empty name: each
    product's line names what is wrong; the others are answered as alone, in order; exit 1."""
    p = pictures["products"]
    missing = str(pictures["folder"] / "nope.jpg")
    products = [p[0], [p[1][0], pictures["png"]], [missing], [p[2][0]] * 5, [pictures["cut"], p[3][0]], p[4],
                [p[5][0], ""]]
    status, answers = run_json(trained[0], products)
    assert status == 1
    assert [a["files"] for a in answers] == products
    assert [a.get("error") for a in answers] == [
        None, f"{pictures['png']}: {NOT_JPEG}", f"{missing}: no such file", "5 files; a product has 1 to 4",
        f"{pictures['cut']}: {TRUNCATED}", None, f"an empty file name in {','.join(products[-1])!r}"]
    assert all(list(a) == ["files", "error"] for a in answers if "error" in a)
    assert_top(answers[0], expected(trained, p[0], 5))
    assert_top(answers[5], expected(trained, p[4], 5))


def test_a_file_name_with_a_comma_and_the_error_names_what_was_given(pictures, tmp_path):
    """Issue 28, item 7: `a,b.jpg` is that file (it exists), `\\,` writes a comma among several
    files, and a file not found is named with the --product value it came from."""
    comma = tmp_path / "a,b.jpg"
    shutil.copy(pictures["products"][0][0], comma)
    other = pictures["products"][1][0]
    assert predict.read_product(str(comma)).files == (str(comma),)
    assert not predict.read_product(str(comma)).error
    escaped = f"{other},{str(comma).replace(',', chr(92) + ',')}"
    product = predict.read_product(escaped)
    assert product.files == (other, str(comma)) and not product.error and len(product.pictures) == 2
    gone = str(tmp_path / "x,y.jpg")
    assert predict.read_product(gone).error == (f"{tmp_path / 'x'}: no such file (a file of --product={gone}; "
                                                "a comma in a file name is written \\,)")


def test_a_picture_over_the_converter_s_size_limit_is_refused_before_any_decode(pictures, tmp_path):
    """Issue 28, item 6: the converter's limit (record_schema.MAX_IMAGE_PIXELS), whatever the export's age."""
    data = bytearray(open(pictures["products"][0][0], "rb").read())
    sof = data.find(b"\xff\xc0")
    data[sof + 5: sof + 9] = (8000).to_bytes(2, "big") * 2
    bomb = tmp_path / "bomb.jpg"
    bomb.write_bytes(bytes(data))
    assert predict.read_product(f"{pictures['products'][0][0]},{bomb}").error == f"{bomb}: {export.TOO_LARGE}"
    assert "4096 * 4096" not in open(os.path.join(REPO, "beam_convert", "jpeg_check.py")).read()
    assert record_schema.MAX_IMAGE_PIXELS == 4096 * 4096


def test_checkpoint_best_reads_export_best_with_its_flip_tta_and_k(trained, pictures):
    files = pictures["products"][1]
    status, (answer,) = run_json(trained[0], [files], checkpoint="best")
    assert status == 0
    assert_top(answer, expected(trained, files, 3, flip_tta=True))  # default top_k: the export's 3
    plain = expected(trained, files, 3)
    assert np.abs(np.array([r["probability"] for r in answer["top"]])
                  - [r["probability"] for r in plain]).max() > 1e-3  # the mirror made a difference
    _, (answer,) = run_json(trained[0], [files], checkpoint="best", top_k=2)
    assert_top(answer, expected(trained, files, 2, flip_tta=True))


def test_text_output(trained, pictures):
    files = pictures["products"][0]
    out = io.StringIO()
    assert predict.run(trained[0], [",".join(files), pictures["png"]], top_k=2, out=out) == 1
    want = expected(trained, files, 2)
    export_path = os.path.join(trained[0], "export")
    assert out.getvalue().splitlines() == [
        f"{export_path} (top 2)",
        ",".join(files),
        *(f"  {i}. {row['probability']:.4f}  {row['category_id']}  {row['name']}" for i, row in enumerate(want, 1)),
        pictures["png"],
        f"  error: {pictures['png']}: {NOT_JPEG}",
    ]
    out = io.StringIO()
    predict.run(trained[0], [",".join(files)], checkpoint="best", out=out)
    assert out.getvalue().splitlines()[0] == f"{os.path.join(trained[0], 'export_best')} (top 3, flip TTA)"


def test_command_errors(trained, pictures, tmp_path):
    model_dir = trained[0]
    product = [pictures["products"][0][0]]
    no_export = tmp_path / "no_export"
    no_export.mkdir()
    shutil.copy(os.path.join(model_dir, record_schema.LABELS_FILE), no_export)
    no_best = tmp_path / "no_best"  # a run trained without val: export/ only
    shutil.copytree(no_export, no_best)
    shutil.copytree(os.path.join(model_dir, "export"), no_best / "export")
    cases = [
        (dict(model_dir=str(no_export)), f"{no_export} has no export/ (saved_model.pb): train first, or let "
                                         "training finish"),
        (dict(model_dir=str(no_best), checkpoint="best"), f"{no_best} has no export_best/: it holds the best epoch's "
         "model, written only when training had a val split (trained without val?); use --checkpoint=final"),
        (dict(model_dir=model_dir, top_k=6), f"--top_k=6, but {model_dir}/export answers 5 categories a product "
                                             "(train with --export_top_k=6, or ask for at most 5)"),
        (dict(model_dir=model_dir, checkpoint="best", top_k=4), f"--top_k=4, but {model_dir}/export_best answers 3"),
        (dict(model_dir=str(tmp_path / "nowhere")), f"--model_dir {tmp_path / 'nowhere'} does not exist"),
    ]
    for options, message in cases:
        with pytest.raises(UserError) as caught:
            predict.run(product_flags=product, out=io.StringIO(), **options)
        assert str(caught.value).startswith(message)
    os.remove(no_best / record_schema.LABELS_FILE)
    with pytest.raises(UserError, match="has no labels.csv"):
        predict.run(str(no_best), product, out=io.StringIO())


def _command(*args, cwd=REPO):
    return subprocess.run([sys.executable, "-m", "model.predict", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300, env={**os.environ, "PYTHONPATH": str(REPO)})


def test_the_command_as_a_user_types_it(trained, pictures):
    p = pictures["products"]
    result = _command(f"--model_dir={trained[0]}", f"--product={','.join(p[1])}", f"--product={pictures['png']}",
                      f"--product={p[2][0]}", "--json", "--top_k=3")
    assert result.returncode == 1, result.stderr
    lines = [json.loads(line) for line in result.stdout.splitlines()]  # nothing but JSON lines
    assert [line["files"] for line in lines] == [p[1], [pictures["png"]], [p[2][0]]]
    assert_top(lines[0], expected(trained, p[1], 3))
    assert lines[1] == {"files": [pictures["png"]], "error": f"{pictures['png']}: {NOT_JPEG}"}
    assert_top(lines[2], expected(trained, [p[2][0]], 3))
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == "model.predict: 1 of 3 products not answered"


def test_a_command_error_is_one_line(trained, pictures, tmp_path):
    """(Its --help, which says the exit status, runs as the installed cdiscount-predict:
    tests/test_commands_console.py.)"""
    result = _command(f"--model_dir={tmp_path}", f"--product={pictures['products'][0][0]}")
    assert result.returncode == 1 and result.stdout == ""
    assert "Traceback" not in result.stderr
    assert result.stderr.splitlines()[-1] == (f"model.predict: error: {tmp_path} has no export/ (saved_model.pb): "
                                              "train first, or let training finish")
