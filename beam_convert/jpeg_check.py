"""A JPEG header check: cheap enough to run on all 12 million pictures.

A full decode costs ~150 us a picture here, several times the rest of the conversion; walking the
markers to the frame header and looking for the end-of-image marker costs a few microseconds and
catches what the data can hold: other formats (PNG, GIF: `tf.io.decode_jpeg` would accept them),
random bytes, truncated files, and headers declaring absurd sizes (decompression bombs).
BUILD_NOTES.md has the measurement behind this choice.
"""

from typing import Optional

import record_schema

_SOI = b"\xff\xd8\xff"
_EOI = b"\xff\xd9"
# Start-of-frame markers carry the dimensions; C4 (DHT), C8 (JPG) and CC (DAC) share the range.
_SOF_MARKERS = frozenset(range(0xC0, 0xD0)) - {0xC4, 0xC8, 0xCC}
# Markers without a length field.
_STANDALONE_MARKERS = frozenset(range(0xD0, 0xD8)) | {0x01}
# Entropy-coded data cannot contain FF D9 (FF is stuffed as FF 00), so a truncated file has no EOI
# near its end; a little slack allows the padding some encoders append after it.
_EOI_SEARCH_BYTES = 64


def check_jpeg(data: bytes, max_pixels: int = record_schema.MAX_IMAGE_PIXELS) -> Optional[tuple[str, str]]:
    """Returns None for a plausible JPEG, else (reason, detail)."""
    if not data.startswith(_SOI):
        return "not_jpeg", f"{len(data)} bytes starting {data[:8].hex()}, not a JPEG (FF D8 FF)"
    if _EOI not in data[-_EOI_SEARCH_BYTES:]:
        return "truncated_jpeg", f"{len(data)} bytes without the end-of-image marker FF D9"
    position = 2
    while position + 4 <= len(data):
        if data[position] != 0xFF:
            return "bad_jpeg", f"expected a marker at byte {position}, found {data[position]:02x}"
        marker = data[position + 1]
        if marker == 0xFF:  # fill byte
            position += 1
            continue
        if marker in _STANDALONE_MARKERS:
            position += 2
            continue
        if marker in (0xD9, 0xDA):
            return "bad_jpeg", "no frame header before the image data"
        segment_length = int.from_bytes(data[position + 2 : position + 4], "big")
        if marker in _SOF_MARKERS:
            if position + 9 > len(data):
                break
            height = int.from_bytes(data[position + 5 : position + 7], "big")
            width = int.from_bytes(data[position + 7 : position + 9], "big")
            if height == 0 or width == 0:
                return "bad_jpeg", f"frame header declares {width}x{height}"
            if width * height > max_pixels:
                return "image_too_large", f"frame header declares {width}x{height} pixels, limit {max_pixels}"
            return None
        if segment_length < 2:
            return "bad_jpeg", f"segment length {segment_length} at byte {position}"
        position += 2 + segment_length
    return "truncated_jpeg", f"{len(data)} bytes end before the frame header"
