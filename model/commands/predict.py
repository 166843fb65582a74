"""Predict products from their JPEG files, through the SavedModel as a server would (docs/FORMATS.md section 4).

    python -m model.predict --model_dir=DIR --product=a.jpg,b.jpg [--product=c.jpg ...]
        [--json] [--top_k=5] [--checkpoint=final|best]

A product is 1 to 4 JPEG files, comma-separated (a comma of a file name is written `\\,`, and a
value that names one existing file is that file); --product repeats, and the products are answered
in the order given. Without --json, each product's files, then its top categories (probability,
category id, name). With --json, one JSON object a line and nothing else on stdout:
    {"files": [...], "top": [{"category_id": ..., "name": ..., "probability": ...}, ...]}
or, for a product that could not be answered, {"files": [...], "error": "FILE: why"}.

A product that cannot be answered (a file missing or not a JPEG, a picture over the converter's
size limit, record_schema.MAX_IMAGE_PIXELS, more than 4 files) gets its error
and the others are still answered. Exit status: 0 when every product was answered; 1 when any was
not (the others are printed), or on an error of the command itself (no export in --model_dir,
--top_k above what the export answers), which is one line `model.predict: error: ...`.
"""

from __future__ import annotations

import dataclasses
import json
import os
import re
import sys

import record_schema
from model.errors import UserError
from model.model_dir import CHECKPOINTS, RunFolder, export_dir

PROG = "model.predict"
BATCH = 32  # products a call of the SavedModel
DEFAULT_TOP_K = 5


@dataclasses.dataclass(frozen=True)
class Product:
    """One --product: its files as given, their bytes once read, or why it cannot be asked."""
    files: tuple[str, ...]
    pictures: tuple[bytes, ...] = ()
    error: str = ""


def product_files(flag_value: str, exists=None) -> tuple[str, ...]:
    """A --product value -> its file names: split at each comma, but `\\,` is a comma of a name,
    and a value that names an existing file (`exists(value)`) is that one file, commas and all."""
    if "," in flag_value and exists is not None and exists(flag_value):
        return (flag_value,)
    parts = re.split(r"(?<!\\),", flag_value)
    return tuple(part.replace("\\,", ",") for part in parts)


def read_product(flag_value: str) -> Product:
    """A --product value, "a.jpg,b.jpg", -> its files read, or the error that stops it (the file named).

    Only the count and the files' existence are checked here: whether they are JPEGs is the
    SavedModel's answer, as a server's would be.
    """
    import tensorflow as tf  # its filesystems: gs://, s3://... as well as local files

    files = product_files(flag_value, tf.io.gfile.exists)
    if not 1 <= len(files) <= record_schema.MAX_IMAGES or files == ("",):
        count = 0 if files == ("",) else len(files)
        return Product(files if count else (), error=f"{count} files; a product has 1 to {record_schema.MAX_IMAGES}")
    if "" in files:
        return Product(files, error=f"an empty file name in {flag_value!r}")
    pictures = []
    for name in files:
        if not tf.io.gfile.exists(name):
            given = "" if name == flag_value else (f" (a file of --product={flag_value}; a comma in a file "
                                                   "name is written \\,)")
            return Product(files, error=f"{name}: no such file{given}")
        if tf.io.gfile.isdir(name):
            return Product(files, error=f"{name}: is a folder, not a file")
        try:
            with tf.io.gfile.GFile(name, "rb") as f:
                pictures.append(f.read())
        except (OSError, tf.errors.OpError) as error:
            return Product(files, error=f"{name}: cannot read ({getattr(error, 'message', error)})")
        if _declared_pixels(pictures[-1]) > record_schema.MAX_IMAGE_PIXELS:
            from model.export import TOO_LARGE  # serving's own words for it

            return Product(files, error=f"{name}: {TOO_LARGE}")
    return Product(files, tuple(pictures))


def _declared_pixels(picture: bytes) -> int:
    """The pixels a JPEG's frame header declares (0 when it does not parse: the SavedModel names
    that): a decompression bomb is refused here, before an export of any age decodes it."""
    import tensorflow as tf

    try:
        height, width, _ = tf.io.extract_jpeg_shape(picture, tf.int64).numpy()
    except tf.errors.OpError:
        return 0
    return int(height) * int(width)


@dataclasses.dataclass(frozen=True)
class Export:
    """A loaded SavedModel and what it answers."""
    path: str
    serve: object  # the serving_default concrete function
    k: int  # the categories it answers a product (min(export_top_k, classes))
    flip_tta: bool | None  # None: exported before the export said (no serving_info signature)
    category_ids: tuple[int, ...]  # labels.csv's, class index -> category id
    names: tuple[str, ...]  # labels.csv's category_level3, the leaf of the category tree


def load_export(model_dir: str, checkpoint: str = "final") -> Export:
    """model_dir's export/ (or export_best/) and its labels.csv; UserError when one is missing."""
    import tensorflow as tf

    run = RunFolder(model_dir)
    folder, path = export_dir(checkpoint), run.export(checkpoint)
    if not tf.io.gfile.isdir(model_dir):
        raise UserError(f"--model_dir {model_dir} does not exist")
    if not tf.io.gfile.exists(os.path.join(path, "saved_model.pb")):
        if checkpoint == "best":
            raise UserError(f"{model_dir} has no {folder}/: it holds the best epoch's model, written only when "
                            "training had a val split (trained without val?); use --checkpoint=final")
        raise UserError(f"{model_dir} has no {folder}/ (saved_model.pb): train first, or let training finish")
    labels_path = run.labels_file
    if not tf.io.gfile.exists(labels_path):
        raise UserError(f"{model_dir} has no {record_schema.LABELS_FILE} (the category names)")
    from model.input_pipeline.labels import read_labels

    labels = read_labels(labels_path)
    loaded = tf.saved_model.load(path)
    serve = loaded.signatures["serving_default"]
    info = loaded.signatures.get("serving_info")
    flip_tta = bool(info()["flip_tta"].numpy()) if info is not None else None
    return Export(path=path, serve=serve, k=int(serve.structured_outputs["category_ids"].shape[-1]),
                  flip_tta=flip_tta, category_ids=tuple(int(c) for c in labels.category_ids),
                  names=tuple(labels.level3))


def check_top_k(export: Export, top_k: int | None) -> int:
    """--top_k (None: DEFAULT_TOP_K, or fewer when the export answers fewer) -> the k to print."""
    if top_k is None:
        return min(DEFAULT_TOP_K, export.k)
    if top_k > export.k:
        raise UserError(f"--top_k={top_k}, but {export.path} answers {export.k} categories a product "
                        f"(train with --export_top_k={top_k}, or ask for at most {export.k})")
    return top_k


_SLOT = re.compile(r"^slot (\d+): (.*)$")


def predict(export: Export, products: list[Product], top_k: int) -> list[dict]:
    """Each product, in order: {"files": [...], "top": [{"category_id", "name", "probability"}, ...]}
    or {"files": [...], "error": "..."}. One call of the SavedModel per BATCH askable products."""
    import numpy as np
    import tensorflow as tf

    answers = [{"files": list(p.files), "error": p.error} if p.error else None for p in products]
    asked = [i for i, p in enumerate(products) if not p.error]
    slots = record_schema.MAX_IMAGES
    for start in range(0, len(asked), BATCH):
        batch = asked[start:start + BATCH]
        images = np.array([list(products[i].pictures) + [b""] * (slots - len(products[i].pictures)) for i in batch],
                          dtype=object)
        mask = np.array([[1.0] * len(products[i].pictures) + [0.0] * (slots - len(products[i].pictures))
                         for i in batch], np.float32)
        out = {name: value.numpy() for name, value in
               export.serve(images=tf.constant(images, tf.string), mask=tf.constant(mask)).items()}
        for row, i in enumerate(batch):
            files = list(products[i].files)
            if not out["valid"][row]:
                answers[i] = {"files": files, "error": _named(out["error"][row].decode(), files)}
                continue
            top = []
            for cls, category_id, probability in zip(out["classes"][row][:top_k], out["category_ids"][row][:top_k],
                                                     out["probabilities"][row][:top_k]):
                if export.category_ids[cls] != category_id:
                    raise UserError(f"labels.csv does not belong to {export.path}: class {cls} is category "
                                    f"{category_id} there, {export.category_ids[cls]} in labels.csv")
                top.append({"category_id": int(category_id), "name": export.names[cls],
                            "probability": float(probability)})
            answers[i] = {"files": files, "top": top}
    return answers


def _named(error: str, files: list[str]) -> str:
    """The SavedModel's "slot N: why" with the file of slot N instead."""
    match = _SLOT.match(error)
    return f"{files[int(match.group(1))]}: {match.group(2)}" if match else error


def format_text(answer: dict) -> str:
    lines = [",".join(answer["files"])]
    if "error" in answer:
        lines.append(f"  error: {answer['error']}")
    for rank, row in enumerate(answer.get("top", []), 1):
        lines.append(f"  {rank}. {row['probability']:.4f}  {row['category_id']}  {row['name']}")
    return "\n".join(lines)


def run(model_dir: str, product_flags: list[str], *, top_k: int | None = None, checkpoint: str = "final",
        as_json: bool = False, out=None) -> int:
    """The command: prints each product's answer to `out` (stdout) in order; returns the exit status
    (1 when any product was not answered). Raises UserError for an error of the command itself."""
    out = out or sys.stdout
    export = load_export(model_dir, checkpoint)
    top_k = check_top_k(export, top_k)
    answers = predict(export, [read_product(value) for value in product_flags], top_k)
    if not as_json:
        tta = {True: ", flip TTA", False: "", None: ""}[export.flip_tta]
        print(f"{export.path} (top {top_k}{tta})", file=out)
    for answer in answers:
        print(json.dumps(answer, ensure_ascii=False) if as_json else format_text(answer), file=out, flush=True)
    failed = sum("error" in a for a in answers)
    if failed:
        print(f"{PROG}: {failed} of {len(answers)} products not answered", file=sys.stderr)
    return 1 if failed else 0


def define_flags():
    """The flags of the command, defined when it runs (model/predict.py), not at import: a test
    process that imports this module and train.py's flags would define --model_dir twice."""
    from absl import flags

    flags.DEFINE_string("model_dir", None, "train.py's model_dir: its export/ (or export_best/) and labels.csv.")
    flags.DEFINE_multi_string("product", None, "One product: 1 to 4 JPEG files, comma-separated (a comma of a "
                              "file name is written \\,). Repeat the flag for more products; they are answered "
                              "in the order given.")
    flags.DEFINE_bool("json", False, "One JSON line a product: {\"files\", \"top\": [{\"category_id\", \"name\", "
                      "\"probability\"}]} or {\"files\", \"error\"}.")
    flags.DEFINE_integer("top_k", None, f"Categories a product (default {DEFAULT_TOP_K}, or fewer when the export "
                         "answers fewer); more than the export answers (train.py --export_top_k) is an error.",
                         lower_bound=1)
    flags.DEFINE_enum("checkpoint", "final", list(CHECKPOINTS),
                      "final: export/ (the final model); best: export_best/ (the best val epoch).")
    flags.mark_flags_as_required(["model_dir", "product"])
    return flags.FLAGS


def main(argv) -> None:
    from absl import app, flags

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])} (a product is --product=a.jpg,b.jpg)")
    from model import cli

    cli.quiet_logs()
    FLAGS = flags.FLAGS
    try:
        status = run(FLAGS.model_dir, FLAGS.product, top_k=FLAGS.top_k, checkpoint=FLAGS.checkpoint,
                     as_json=FLAGS.json)
    except UserError as error:
        sys.exit(f"{PROG}: error: {error}")
    sys.exit(status)
