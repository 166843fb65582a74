"""File access through Beam's FileSystems (local, gs://, s3://, hdfs://...), and TFRecord framing."""

import contextlib
import errno
import os
import shutil
import struct
from typing import BinaryIO, Iterator, Optional

import google_crc32c
from apache_beam.io.filesystem import CompressionTypes
from apache_beam.io.filesystems import FileSystems

_LENGTH = struct.Struct("<Q")
_CRC = struct.Struct("<I")


def open_read(path: str) -> BinaryIO:
    return FileSystems.open(path, compression_type=CompressionTypes.UNCOMPRESSED)


def create(path: str) -> BinaryIO:
    return FileSystems.create(path, compression_type=CompressionTypes.UNCOMPRESSED)


@contextlib.contextmanager
def naming(path: str) -> Iterator[None]:
    """Puts `path` into an OSError that lacks a file name: a failed write() or close() (a full disk)
    says only "[Errno 28] No space left on device", not where."""
    try:
        yield
    except OSError as error:
        if error.filename is None and error.errno is not None:
            raise OSError(error.errno, error.strerror, path) from None
        raise


def read_bytes(path: str) -> bytes:
    with open_read(path) as f:
        return f.read()


def write_bytes(path: str, data: bytes) -> None:
    with naming(path), create(path) as f:
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
    with naming(destination), create(destination) as out:
        for source in sources:
            with open_read(source) as f:
                while chunk := f.read(BufferedWriter.FLUSH_BYTES):
                    out.write(chunk)


def copy_range(source: str, start: int, end: Optional[int], out: BinaryIO) -> None:
    """Appends bytes [start, end) of source (to its end when end is None) to the open file out."""
    if FileSystems.get_scheme(source) is None and _copy_in_kernel(source, start, end, out):
        return
    with open_read(source) as f:
        if start:
            f.seek(start)
        position = start
        while end is None or position < end:
            want = BufferedWriter.FLUSH_BYTES if end is None else min(BufferedWriter.FLUSH_BYTES, end - position)
            with naming(source):
                chunk = f.read(want)
            if not chunk:
                if end is not None:
                    raise OSError(f"{source}: ends at byte {position:,}, expected {end:,} bytes")
                return
            out.write(chunk)
            position += len(chunk)


# copy_file_range refuses these where the kernel or the filesystem cannot copy: copy through Python.
_NO_KERNEL_COPY = {errno.EXDEV, errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.EINVAL, errno.EBADF}


def _copy_in_kernel(source: str, start: int, end: Optional[int], out: BinaryIO) -> bool:
    """copy_range between local files by os.copy_file_range: the bytes never pass through Python
    (200 MB of fresh files: 0.1-0.2 s against 0.85-1.1 s through 16 MB buffers, on the 2-core build
    machine). False, having copied nothing, where it cannot be used."""
    try:
        out_fd = out.fileno()
    except (AttributeError, OSError, ValueError):  # io.UnsupportedOperation is both of the last two
        return False
    if not hasattr(os, "copy_file_range"):
        return False
    with naming(source):
        fd = os.open(source, os.O_RDONLY)
    try:
        end = os.fstat(fd).st_size if end is None else end
        out.flush()  # what out holds in its buffer goes first
        position = start
        while position < end:
            try:
                copied = os.copy_file_range(fd, out_fd, end - position, position)
            except OSError as error:
                if position == start and error.errno in _NO_KERNEL_COPY:
                    return False
                raise
            if not copied:
                raise OSError(f"{source}: ends at byte {position:,}, expected {end:,} bytes")
            position += copied
        return True
    finally:
        os.close(fd)


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
        with naming(path):
            self._file = create(path)
        self._pending: list[bytes] = []
        self._pending_bytes = 0

    def write(self, data: bytes) -> None:
        self._pending.append(data)
        self._pending_bytes += len(data)
        if self._pending_bytes >= self.FLUSH_BYTES:
            self._flush()

    def _flush(self) -> None:
        with naming(self.path):
            self._file.write(b"".join(self._pending))
        self._pending.clear()
        self._pending_bytes = 0

    def close(self) -> None:
        self._flush()
        with naming(self.path):
            self._file.close()
