"""File access through Beam's FileSystems (local, gs://, s3://, hdfs://...), and TFRecord framing."""

import os
import shutil
import struct
from typing import BinaryIO

import google_crc32c
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")


def open_read(path: str) -> BinaryIO:
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def create(path: str) -> BinaryIO:
    return FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)


def read_bytes(path: str) -> bytes:
    with open_read(path) as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    with create(path) as f:
        f.write(data)


def join(*parts: str) -> str:
    return FileSystems.join(*parts)


def glob(pattern: str) -> list[str]:
    """Sorted paths matching `pattern`; none is not an error."""
    (result,) = FileSystems.match([pattern])
    return sorted(metadata.path for metadata in result.metadata_list)


def glob_with_sizes(pattern: str) -> list[tuple[str, int]]:
    (result,) = FileSystems.match([pattern])
    return sorted((metadata.path, metadata.size_in_bytes) for metadata in result.metadata_list)


def concatenate(sources, destination: str) -> None:
    """Writes the sources' bytes, in order, into destination; the sources stay."""
    with create(destination) as out:
        for source in sources:
            with open_read(source) as f:
                while chunk := f.read(BufferedWriter.FLUSH_BYTES):
                    out.write(chunk)


def make_folder(path: str) -> None:
    """Creates a local folder and its parents; object stores have no folders to create."""
    if FileSystems.get_scheme(path) is None:
        os.makedirs(path, exist_ok=True)


def make_writable_folder(path: str) -> None:
    """Creates `path` if need be and proves that a file can be written in it; raises if not.

    Object stores have no folders and grant writes per bucket or prefix: writing (and deleting) a
    small file is the one check that holds on every filesystem.
    """
    probe = join(path, ".write-check")
    write_bytes(probe, b"")
    delete([probe])


def delete(paths: list[str]) -> None:
    if paths:
        FileSystems.delete(paths)


def list_dir(path: str) -> list[str]:
    """Full paths of the entries (files and folders) directly inside `path`; [] if it is missing."""
    if FileSystems.get_scheme(path) is None:
        return sorted(os.path.join(path, name) for name in os.listdir(path)) if os.path.isdir(path) else []
    prefix = path.rstrip("/") + "/"
    return sorted({prefix + found[len(prefix):].split("/")[0] for found in glob(prefix + "**")})


def delete_tree(path: str) -> None:
    """Deletes a folder of temporary files (object stores have no real folders)."""
    if FileSystems.get_scheme(path) is None:
        shutil.rmtree(path, ignore_errors=True)
        return
    for depth in range(3, 0, -1):
        delete(glob(join(path, *["*"] * depth)))


def _masked_crc(data: bytes) -> int:
    crc = google_crc32c.value(data)
    return (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF


def tfrecord_frame(record: bytes) -> bytes:
    """One TFRecord: length, masked CRC32C of the length, data, masked CRC32C of the data."""
    length = _LENGTH.pack(len(record))
    return length + _CRC.pack(_masked_crc(length)) + record + _CRC.pack(_masked_crc(record))


class BufferedWriter:
    """Appends to a file in large writes: remote filesystems charge per call."""

    FLUSH_BYTES = 16 * 1024 * 1024

    def __init__(self, path: str):
        self.path = path
        self._file = create(path)
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def write(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= self.FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        self._file.write(b"".join(self._pending))
        self._pending.clear()
        self._pending_bytes = 0

    def close(self) -> None:
        self._flush()
        self._file.close()
