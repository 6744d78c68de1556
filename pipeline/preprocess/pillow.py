"""Pillow(-SIMD) backend: JPEG draft decoding, one fused resize of the crop."""

from __future__ import annotations

import io
import warnings
from typing import Sequence

import numpy as np
from PIL import Image, ImageOps, UnidentifiedImageError

from pipeline.errors import InputError
from pipeline.preprocess import Outcome
from pipeline.spec import InputLimits, PreprocessSpec

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
}
WHITE = (255, 255, 255)
SIXTEEN_BIT_MODES = {"I", "I;16", "I;16B", "I;16L", "I;16N"}

# We enforce our own pixel cap before decoding (InputLimits.max_image_pixels).
Image.MAX_IMAGE_PIXELS = None


def open_image(data: bytes, limits: InputLimits) -> Image.Image:
    """Parse the header only and refuse oversized images before decoding."""
    if not data:
        raise InputError("empty_file", "file is empty (0 bytes)")
    try:
        image = Image.open(io.BytesIO(data))
    except UnidentifiedImageError as exc:
        raise InputError("not_an_image", "not a recognised image format") from exc
    except (OSError, SyntaxError, ValueError) as exc:
        raise InputError("decode_failed", f"unreadable image header: {exc}") from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError("decode_failed", f"image has no pixels ({width}x{height})")
    if width * height > limits.max_image_pixels:
        raise InputError(
            "image_too_large",
            f"{width}x{height} pixels exceeds the limit of {limits.max_image_pixels:,} pixels",
        )
    return image


def load_pixels(image: Image.Image, spec: PreprocessSpec) -> Image.Image:
    """Decode (at a reduced DCT scale when the JPEG is at least 2x the target)."""
    if image.format == "JPEG":
        image.draft(image.mode, (spec.resize_shorter, spec.resize_shorter))
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            return ImageOps.exif_transpose(image) or image
    except OSError as exc:
        if "truncated" in str(exc):
            raise InputError("truncated", f"image data is truncated: {exc}") from exc
        raise InputError("decode_failed", f"cannot decode image: {exc}") from exc
    except (SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise InputError("decode_failed", f"cannot decode image: {exc}") from exc


def to_rgb_or_l(image: Image.Image) -> Image.Image:
    """Reduce any mode to 8-bit "RGB" or "L"; alpha is composited over white."""
    if image.mode in ("RGB", "L"):
        return image
    if image.mode in SIXTEEN_BIT_MODES:
        wide = np.asarray(image, dtype=np.uint32)
        return Image.fromarray((np.clip(wide, 0, 65535) >> 8).astype(np.uint8), "L")
    if image.mode == "F":
        return Image.fromarray(np.clip(np.asarray(image), 0, 255).astype(np.uint8), "L")
    if image.mode in ("RGBA", "LA", "PA", "RGBa", "La") or "transparency" in image.info:
        rgba = image.convert("RGBA")
        background = Image.new("RGB", rgba.size, WHITE)
        background.paste(rgba, mask=rgba.getchannel("A"))
        return background
    return image.convert("RGB")


def transform(image: Image.Image, spec: PreprocessSpec) -> np.ndarray:
    """Resize-shorter + centre-crop as one resample of the kept box; CHW uint8."""
    box = spec.crop_box(*image.size)
    cropped = image.resize((spec.crop, spec.crop), RESAMPLE[spec.interpolation], box=box)
    pixels = np.asarray(cropped)
    if pixels.ndim == 2:
        return np.ascontiguousarray(np.broadcast_to(pixels, (3, *pixels.shape)))
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def preprocess(data: bytes, spec: PreprocessSpec, limits: InputLimits) -> np.ndarray:
    """Encoded image bytes -> uint8 array of shape `spec.output_shape`."""
    image = load_pixels(open_image(data, limits), spec)
    return transform(to_rgb_or_l(image), spec)


class PillowBackend:
    """Decodes one image at a time; parallelism comes from the worker pool."""

    name = "pillow"

    def __init__(self, spec: PreprocessSpec, limits: InputLimits) -> None:
        self.spec = spec
        self.limits = limits

    def setup(self) -> None:
        pass

    def run(self, images: Sequence[bytes]) -> list[Outcome]:
        return [self._one(data) for data in images]

    def _one(self, data: bytes) -> Outcome:
        try:
            return preprocess(data, self.spec, self.limits)
        except InputError as exc:
            return exc

    def close(self) -> None:
        pass
