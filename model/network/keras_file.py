"""A saved .keras model read back: the one place a .keras is loaded (--init_from, evaluate.py's
models and ensemble members, best.keras at the end of training, a resumed run included).

A .keras is a zip whose directory is at its end, so a file cut short (a half-finished copy,
0 bytes) has none: that is checked first, reading only the file's tail (zipfile.is_zipfile, ~0.1 ms
whatever the size; a full CRC check would read the whole file again, a second download on gs://),
and reported in one line naming the file as damaged, where Keras said "File not found". A whole
directory over damaged content fails inside Keras' reader, and is named the same way.
"""

from __future__ import annotations

import zipfile
import zlib

import keras
import tensorflow as tf

from model.errors import UserError
from model.network import multi_image  # noqa: F401  (registers the custom layers for deserialisation)

NOT_WHOLE = "not a whole .keras file (cut short, or empty?)"


def is_whole(path: str) -> bool:
    """Whether `path` ends with a zip directory (any filesystem tf.io.gfile knows)."""
    try:
        with tf.io.gfile.GFile(path, "rb") as f:
            return zipfile.is_zipfile(f)
    except (OSError, tf.errors.OpError):
        return False


def load(path: str) -> keras.Model:
    """The model saved at `path`, uncompiled. UserError (one line) if the file is not a whole .keras."""
    if not is_whole(path):
        raise UserError(damaged(path, NOT_WHOLE))
    try:
        return keras.models.load_model(path, compile=False)
    except (zipfile.BadZipFile, zlib.error, EOFError) as error:
        raise UserError(damaged(path, str(error))) from None


def damaged(path: str, why: str) -> str:
    return f"{path} is damaged: {why}; copy it again or train it again"
