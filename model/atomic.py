"""Files a user relies on are written whole or not at all: to a temporary name beside the final
one, then renamed over it. A kill or a full disk mid-write leaves the earlier file (or none),
never a truncated one under the final name; the failure is one line naming the path.

Paths may be on any filesystem TensorFlow knows. A file rename is atomic on local disks and
single-object on gs://; a folder (the SavedModel, an evaluation) is renamed whole on a local disk
and moved file by file elsewhere, its completion marker (saved_model.pb, metrics.json) last.
"""

from __future__ import annotations

import contextlib
import errno
import os

import tensorflow as tf

from model.errors import UserError

PARTIAL = ".partial-"  # a prefix, not a suffix: object stores list by prefix, and Keras wants ".keras" last


def partial_path(path: str) -> str:
    parent, name = os.path.split(path.rstrip("/"))
    return os.path.join(parent, PARTIAL + name)


@contextlib.contextmanager
def written_whole(path: str, last: str = ""):
    """Yields a temporary path to write `path`'s content to (a file, or a folder the caller
    creates); renames it into place on success, removes it on failure. `last`: a folder's file
    whose presence means complete, moved last where the folder is moved file by file. An OSError
    or TensorFlow I/O error becomes a one-line UserError."""
    partial = partial_path(path)
    _remove(partial)
    try:
        with write_errors_named(path):
            yield partial
            if tf.io.gfile.isdir(partial):
                _replace_folder(partial, path, last)
            else:
                tf.io.gfile.rename(partial, path, overwrite=True)
    finally:
        _remove(partial)


def copy_folder(source: str, destination: str) -> None:
    """Copies a folder tree file by file (any filesystem tf.io.gfile reads); destination is made."""
    for folder, _, names in tf.io.gfile.walk(source):
        target = destination + folder[len(source):]  # walk joins below `source` as given (gs:// too)
        tf.io.gfile.makedirs(target)
        for name in names:
            path = os.path.join(folder, name)
            if tf.io.gfile.exists(path):  # ram:// lists a sibling "export_best" under "export" as "_best"
                tf.io.gfile.copy(path, os.path.join(target, name), overwrite=True)


def write_text(path: str, text: str) -> None:
    with written_whole(path) as partial, tf.io.gfile.GFile(partial, "w") as f:
        f.write(text)


_WRITE_ERRNOS = (errno.ENOSPC, errno.EDQUOT, errno.EACCES, errno.EPERM, errno.EROFS, errno.EAGAIN)


@contextlib.contextmanager
def write_errors_named(path: str):
    """A full disk, a read-only or unwritable folder, a file locked by another process, while
    working under `path`: one line that names the file and the reason. Other errors pass through."""
    try:
        yield
    except OSError as error:
        if error.errno not in _WRITE_ERRNOS:
            raise
        raise UserError(f"{error.filename or path}: {os.strerror(error.errno)}") from None
    except (tf.errors.ResourceExhaustedError, tf.errors.PermissionDeniedError) as error:
        raise UserError(f"{path}: {_first_line(error.message)}") from None


def _first_line(message: str) -> str:
    return (message.strip().splitlines() or [""])[0]


def _remove(path: str) -> None:
    try:
        if tf.io.gfile.isdir(path):
            tf.io.gfile.rmtree(path)
        elif tf.io.gfile.exists(path):
            tf.io.gfile.remove(path)
    except (OSError, tf.errors.OpError):
        pass  # a leftover partial is harmless: the next write replaces it


def _replace_folder(partial: str, path: str, last: str) -> None:
    if tf.io.gfile.exists(path):
        try:
            tf.io.gfile.rmtree(path)
        except tf.errors.NotFoundError:
            pass  # ram:// says a mere name prefix exists (export, for export_best/'s files)
    if "://" not in partial or partial.startswith("file://"):
        tf.io.gfile.rename(partial, path)  # a local folder: one atomic rename
        return
    # Object stores have no folder rename (and ram:// "renames" a folder without its files):
    # file by file, the completion marker last.
    files = [os.path.join(root, name)[len(partial):].lstrip("/")
             for root, _, names in tf.io.gfile.walk(partial) for name in names]
    for name in sorted(files, key=lambda n: n == last):
        tf.io.gfile.makedirs(os.path.dirname(os.path.join(path, name)))
        tf.io.gfile.rename(os.path.join(partial, name), os.path.join(path, name), overwrite=True)
