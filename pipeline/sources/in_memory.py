"""Images a program holds (paths, bytes, PIL images, arrays) as Jobs.

Paths are read by the preprocessing workers, as files are for `score`. Bytes
go to them as they are. PIL images and uint8 arrays are copied into an
uncompressed image file in memory, which the workers decode like any other:
binary PNM (PPM/PGM) for RGB and greyscale pixels, uncompressed TIFF for those
with alpha or 16 bits. Writing PNM is one copy of the pixels behind a short
header; decoding it is another. The bytes are also what the cache keys, so
the same pixels hit it again.

A PIL image is first turned upright by its EXIF orientation, as a file is.
Nothing here raises for a bad item: it becomes a Job carrying its error.
"""

from __future__ import annotations

import io
import os
import sys
from typing import TYPE_CHECKING, Any

import numpy as np

from pipeline.errors import InputError, first_line
from pipeline.items import Job
from pipeline.spec import InputLimits

if TYPE_CHECKING:
    from PIL import Image

PNM_MODES = {"L": b"P5", "RGB": b"P6"}
ALPHA_MODES = ("RGBA", "LA", "PA", "RGBa", "La")
TIFF_MODES = ("RGBA", "I;16", "I;16B", "I;16L", "I;16N", "I", "F")
CHANNELS_MODE = {1: "L", 3: "RGB", 4: "RGBA"}
WHAT_ITEMS_ARE = "a path (str or os.PathLike), bytes, a PIL image or a uint8 HxWxC array"


def to_job(item: Any, index: int, limits: InputLimits) -> Job:
    """A Job for one item; `index` names the ones that have no path of their own
    (`<bytes #3>`, `<image #4>`, `<array #5>`)."""
    if isinstance(item, str | os.PathLike):
        return Job(os.fsdecode(os.fspath(item)))
    if isinstance(item, bytes | bytearray | memoryview):
        return _bytes_job(bytes(item), f"<bytes #{index}>", limits)
    if isinstance(item, np.ndarray):
        return _encoded(f"<array #{index}>", lambda: encode_array(item, limits))
    if _is_pil_image(item):
        return _encoded(f"<image #{index}>", lambda: encode_image(item, limits))
    kind = type(item).__name__
    return Job(f"<{kind} #{index}>", InputError(
        "not_an_image", f"an item of type {kind} is not an image: pass {WHAT_ITEMS_ARE}"))


def _bytes_job(data: bytes, name: str, limits: InputLimits) -> Job:
    if len(data) > limits.max_file_bytes:
        return Job(name, InputError("file_too_large", f"{len(data):,} bytes; the limit is "
                                    f"{limits.max_file_bytes:,}"))
    return Job(name, data=data)


def _encoded(name: str, encode: Any) -> Job:
    try:
        return Job(name, data=encode())
    except InputError as exc:
        return Job(name, exc)
    except (OSError, ValueError, TypeError, SyntaxError, MemoryError) as exc:
        code = "truncated" if "truncated" in str(exc).lower() else "decode_failed"
        return Job(name, InputError(code, f"cannot read the image: {first_line(exc)}"))


def encode_array(pixels: np.ndarray, limits: InputLimits) -> bytes:
    """uint8 HxW, HxWx1 (greyscale), HxWx3 (RGB) or HxWx4 (RGBA) pixels as an image file."""
    shape = pixels.shape
    if pixels.dtype != np.uint8 or len(shape) not in (2, 3) or (
            len(shape) == 3 and shape[2] not in CHANNELS_MODE):
        raise InputError("not_an_image", f"an array of {pixels.dtype} with shape {shape} is "
                         "not an image: pass uint8 pixels shaped HxW, HxWx1, HxWx3 (RGB) or "
                         "HxWx4 (RGBA)")
    height, width = shape[:2]
    _check_size(width, height, limits)
    mode = "L" if len(shape) == 2 else CHANNELS_MODE[shape[2]]
    if mode in PNM_MODES:
        return _pnm(mode, width, height, np.ascontiguousarray(pixels).tobytes())
    from PIL import Image

    return _tiff(Image.fromarray(np.ascontiguousarray(pixels), mode))


def encode_image(image: Image.Image, limits: InputLimits) -> bytes:
    """A PIL image, upright, as an image file the decoders read losslessly."""
    from pipeline.preprocess.pillow import upright

    _check_size(*image.size, limits)
    image = upright(image)
    if image.mode not in PNM_MODES and image.mode not in TIFF_MODES:
        alpha = image.mode in ALPHA_MODES or "transparency" in image.info
        image = image.convert("RGBA" if alpha else "RGB")  # as decoding would
    if image.mode in PNM_MODES:
        return _pnm(image.mode, *image.size, image.tobytes())
    return _tiff(image)


def _check_size(width: int, height: int, limits: InputLimits) -> None:
    if width < 1 or height < 1:
        raise InputError("decode_failed", f"image has no pixels ({width}x{height})")
    if width * height > limits.max_image_pixels:
        raise InputError("image_too_large", f"{width}x{height} pixels exceeds the limit of "
                         f"{limits.max_image_pixels:,} pixels")


def _pnm(mode: str, width: int, height: int, pixels: bytes) -> bytes:
    return b"%s\n%d %d\n255\n" % (PNM_MODES[mode], width, height) + pixels


def _tiff(image: Image.Image) -> bytes:
    out = io.BytesIO()
    image.save(out, "TIFF", compression="raw")
    return out.getvalue()


def _is_pil_image(item: Any) -> bool:
    # Where PIL was never imported, nothing can be a PIL image: no need to import it.
    image_module = sys.modules.get("PIL.Image")
    return image_module is not None and isinstance(item, image_module.Image)
