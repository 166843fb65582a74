"""Framing of mongodump BSON files: documents back to back, each starting with its int32 length.

BSON has no sync markers, so a reader cannot start at an arbitrary byte: the job first scans a
file once (sequentially, which is also what remote filesystems are fast at) to find document
boundaries, then reads ranges of whole documents in parallel.

A document that cannot be framed (an impossible length prefix, one past the end of the file, no
closing NUL) stops the scan; with --skip_corrupt the scan resynchronises (resync): a document
over 16 MiB whose declared end is confirmed by the documents after it is skipped as one
document; otherwise the reader looks for the next byte from which RESYNC_CONFIRM documents in a
row frame and decode, and the bytes in between are reported as lost (their documents cannot be
counted: nothing frames them).
"""

import dataclasses
import struct
from typing import BinaryIO, Iterator, Optional

import bson
import numpy as np

# mongod refuses documents over 16 MiB; anything larger is a broken length prefix.
MAX_DOCUMENT_BYTES = 16 * 1024 * 1024
MIN_DOCUMENT_BYTES = 5  # int32 length + terminating NUL
READ_CHUNK_BYTES = 8 * 1024 * 1024

_INT32 = struct.Struct("<i")
_INT64 = struct.Struct("<q")
# The real files store `_id` first and `category_id` (int32) last: peeking at those bytes avoids
# decoding ~10 KB of images per document during the index scan.
_ID_INT32_PREFIX = b"\x10_id\x00"
_ID_INT64_PREFIX = b"\x12_id\x00"
_CATEGORY_INT32_TAIL = b"\x10category_id\x00"


class CorruptBsonError(ValueError):
    """A document that cannot be framed or decoded; names the file and byte offset."""

    def __init__(self, path: str, offset: int, reason: str):
        super().__init__(f"{path}: corrupt BSON document at byte offset {offset}: {reason}")
        self.path = path
        self.offset = offset
        self.reason = reason


def iter_documents(
    stream: BinaryIO, path: str, start: int = 0, end: Optional[int] = None
) -> Iterator[tuple[int, bytes]]:
    """Yields (byte offset, raw document) from `stream`, which is positioned at `start`.

    Stops at `end` (exclusive) or at the end of the stream. Raises CorruptBsonError for a length
    prefix that is impossible or runs past the end of the data.
    """
    buffer = b""
    local = 0  # index of `offset` in buffer
    offset = start

    def available(needed: int) -> int:
        """Reads until buffer[local:] holds `needed` bytes, or the data ends; returns what it holds."""
        nonlocal buffer, local
        if len(buffer) - local < needed:
            buffer, local = buffer[local:], 0
            while len(buffer) < needed:
                want = max(READ_CHUNK_BYTES, needed - len(buffer))
                if end is not None:
                    want = min(want, end - offset - len(buffer))
                chunk = stream.read(want) if want > 0 else b""
                if not chunk:
                    break
                buffer += chunk
        return len(buffer) - local

    while end is None or offset < end:
        have = available(4)
        if have == 0:
            return
        if have < 4:
            raise CorruptBsonError(path, offset, f"truncated: {have} bytes left, too few for a length prefix")
        (length,) = _INT32.unpack_from(buffer, local)
        if not MIN_DOCUMENT_BYTES <= length <= MAX_DOCUMENT_BYTES:
            raise CorruptBsonError(path, offset, f"impossible document length {length}")
        if end is not None and offset + length > end:
            raise CorruptBsonError(path, offset, f"document of {length} bytes crosses the range end {end}")
        have = available(length)
        if have < length:
            raise CorruptBsonError(
                path, offset, f"truncated: document of {length} bytes, only {have} bytes left in the file"
            )
        document = buffer[local : local + length]
        if document[-1] != 0:
            raise CorruptBsonError(path, offset, "document does not end with a NUL byte")
        yield offset, document
        local += length
        offset += length


@dataclasses.dataclass(frozen=True)
class DocumentKeys:
    """What the index scan needs from a document without decoding its images."""

    product_id: Optional[int]
    category_id: Optional[int]
    decodable: bool = True


def peek_keys(document: bytes) -> DocumentKeys:
    """Reads `_id` and `category_id`, on the fast path from fixed positions, else by decoding."""
    product_id = category_id = None
    fast = True
    if document.startswith(_ID_INT32_PREFIX, 4):
        (product_id,) = _INT32.unpack_from(document, 4 + len(_ID_INT32_PREFIX))
    elif document.startswith(_ID_INT64_PREFIX, 4):
        (product_id,) = _INT64.unpack_from(document, 4 + len(_ID_INT64_PREFIX))
    else:
        fast = False
    tail = document[-(len(_CATEGORY_INT32_TAIL) + 5) :]
    if tail.startswith(_CATEGORY_INT32_TAIL):
        (category_id,) = _INT32.unpack_from(tail, len(_CATEGORY_INT32_TAIL))
    elif b"category_id\x00" in document:
        fast = False
    if fast:
        return DocumentKeys(product_id, category_id)
    try:
        decoded = bson.decode(document)
    except Exception:  # noqa: BLE001 - the convert stage reports it with its offset
        return DocumentKeys(None, None, decodable=False)
    product_id = decoded.get("_id")
    category_id = decoded.get("category_id")
    return DocumentKeys(
        product_id if isinstance(product_id, int) else None,
        category_id if isinstance(category_id, int) else None,
    )


# --- resynchronising after a document that cannot be framed (--skip_corrupt) ----------------------

RESYNC_CONFIRM = 3  # documents in a row (or fewer, ending exactly at the end of the file) that must frame and decode
_SCAN_CHUNK = 1 << 20
_ELEMENT_TYPES = np.zeros(256, bool)
_ELEMENT_TYPES[[*range(0x01, 0x14), 0x7F, 0xFF]] = True  # the BSON element types
_KEY_START = np.zeros(256, bool)
_KEY_START[0x20:0x7F] = True  # a first key that starts with printable ASCII (`_id`, `imgs`, ...)


@dataclasses.dataclass(frozen=True)
class SkippedSpan:
    """Bytes [start, end) of a file that could not be read as documents; framing starts again at
    `end` unless `rest_of_file`. `one_document`: the span is one whole document whose declared
    length is over MAX_DOCUMENT_BYTES (its end confirmed by the documents after it), so it held
    one product (`product_id` when its leading _id could be read)."""

    start: int
    end: int
    rest_of_file: bool
    one_document: bool = False
    product_id: Optional[int] = None

    def describe(self, reason: str) -> str:
        if self.one_document:
            return (f"{reason}: one whole document of {self.end - self.start:,} bytes, over BSON's 16 MiB limit; "
                    f"skipped (bytes {self.start}-{self.end}), reading on after it")
        lost = (f"bytes {self.start}-{self.end} ({self.end - self.start:,} bytes) could not be framed, the "
                "documents in them are lost")
        if self.rest_of_file:
            return f"{reason}; {lost}; rest of file skipped"
        return f"{reason}; {lost}; reading on from the next document, at byte {self.end}"


def resync(stream: BinaryIO, offset: int) -> SkippedSpan:
    """After a CorruptBsonError at `offset`: the span to skip. The declared length is taken when
    it is over MAX_DOCUMENT_BYTES, the document it frames ends with NUL and RESYNC_CONFIRM
    documents follow it (an oversized document: one product). Otherwise the span runs to the
    next byte from which RESYNC_CONFIRM documents in a row frame and decode (each one's first
    element of a known type, its key starting with printable ASCII), found by one scan of the
    rest of the file; none: to the end of the file."""
    stream.seek(0, 2)
    size = stream.tell()
    head = _read_at(stream, offset, 64)
    if len(head) >= 4:
        (length,) = _INT32.unpack_from(head)
        end = offset + length
        if length > MAX_DOCUMENT_BYTES and end <= size and _read_at(stream, end - 1, 1) == b"\x00" \
                and _confirmed_at(stream, end, size):
            return SkippedSpan(offset, end, end == size, True, _leading_id(head))
    for start in _candidates(stream, offset + 1, size):
        if _confirmed_at(stream, start, size):
            return SkippedSpan(offset, start, False)
    return SkippedSpan(offset, size, True)


def _leading_id(head: bytes) -> Optional[int]:
    if head.startswith(_ID_INT32_PREFIX, 4) and len(head) >= 13:
        return _INT32.unpack_from(head, 4 + len(_ID_INT32_PREFIX))[0]
    if head.startswith(_ID_INT64_PREFIX, 4) and len(head) >= 17:
        return _INT64.unpack_from(head, 4 + len(_ID_INT64_PREFIX))[0]
    return None


def _read_at(stream: BinaryIO, offset: int, length: int) -> bytes:
    stream.seek(offset)
    return stream.read(length)


def _confirmed_at(stream: BinaryIO, offset: int, size: int) -> bool:
    """Whether RESYNC_CONFIRM documents in a row (or up to the end of the file) start at `offset`
    and decode as BSON."""
    for _ in range(RESYNC_CONFIRM):
        if offset == size:
            return True
        head = _read_at(stream, offset, 4)
        if len(head) < 4:
            return False
        (length,) = _INT32.unpack(head)
        if not MIN_DOCUMENT_BYTES < length <= MAX_DOCUMENT_BYTES or offset + length > size:
            return False
        if _read_at(stream, offset + length - 1, 1) != b"\x00":  # before reading up to 16 MiB
            return False
        document = _read_at(stream, offset, length)
        try:
            bson.decode(document)
        except Exception:  # noqa: BLE001 - bson raises several types
            return False
        offset += length
    return True


def _candidates(stream: BinaryIO, start: int, size: int) -> Iterator[int]:
    """The offsets from `start` on that could begin a document: a length prefix that fits the file,
    followed by an element of a known type whose key starts with printable ASCII (vectorised: a
    few ms a MB)."""
    position = start
    while position < size - MIN_DOCUMENT_BYTES:
        window = np.frombuffer(_read_at(stream, position, _SCAN_CHUNK + 5), np.uint8)
        count = len(window) - 5
        if count <= 0:
            return
        b = [window[k:k + count].astype(np.int64) for k in range(4)]
        lengths = b[0] | (b[1] << 8) | (b[2] << 16) | (b[3] << 24)
        here = position + np.arange(count)
        fits = (lengths > MIN_DOCUMENT_BYTES) & (lengths <= MAX_DOCUMENT_BYTES) & (here + lengths <= size)
        fits &= _ELEMENT_TYPES[window[4:4 + count]] & _KEY_START[window[5:5 + count]]
        for candidate in here[fits]:
            yield int(candidate)
        position += count
