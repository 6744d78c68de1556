"""JPEGs whose data ends before their pixels do, made from real ones."""

from __future__ import annotations

import io
import struct
from pathlib import Path

from PIL import Image

SOF_MARKERS = {0xC0, 0xC1, 0xC2}  # baseline, extended, progressive
EOI = b"\xff\xd9"
# Shared test photographs beside the checkout (absent on some machines).
IMAGENET_VAL_100 = Path(__file__).resolve().parents[2] / "shared" / "data" / "imagenet-val-100"


def reencoded(data: bytes, **options: object) -> bytes:
    """The same picture saved again as JPEG with other options (progressive, ...)."""
    buffer = io.BytesIO()
    with Image.open(io.BytesIO(data)) as image:
        image.save(buffer, "JPEG", quality=90, **options)
    return buffer.getvalue()


def claimed_size(data: bytes) -> tuple[int, int]:
    """(width, height) as the JPEG's start-of-frame header says."""
    height, width = struct.unpack_from(">HH", data, _sof_offset(data) + 5)
    return width, height


def claiming(data: bytes, width: int, height: int) -> bytes:
    """`data` with its start-of-frame header edited to claim width x height."""
    patched = bytearray(data)
    struct.pack_into(">HH", patched, _sof_offset(data) + 5, height, width)
    return bytes(patched)


def cut_with_end_marker(data: bytes, fraction: float = 0.5) -> bytes:
    """The first part of `data`, closed with an end-of-image marker."""
    return data[:int(len(data) * fraction)] + EOI


def imagenet_photos() -> list[Path]:
    """The shared ImageNet validation photographs, or [] where they are absent."""
    return sorted(IMAGENET_VAL_100.glob("*/*.JPEG")) if IMAGENET_VAL_100.is_dir() else []


def _sof_offset(data: bytes) -> int:
    position = 2  # after SOI
    while data[position + 1] not in SOF_MARKERS:
        position += 2 + struct.unpack_from(">H", data, position + 2)[0]
    return position
