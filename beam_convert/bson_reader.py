"""Framing of mongodump BSON files: documents back to back, each starting with its int32 length.

BSON has no sync markers, so a reader cannot start at an arbitrary byte: the job first scans a
file once (sequentially, which is also what remote filesystems are fast at) to find document
boundaries, then reads ranges of whole documents in parallel.
"""

import dataclasses
import struct
from typing import BinaryIO, Iterator, Optional

import bson

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
