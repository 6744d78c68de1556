"""Pillow(-SIMD) backend: JPEG draft decoding, one fused resize of the crop."""

from __future__ import annotations

import io
import warnings
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, UnidentifiedImageError

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
ORIENTATION_TAG = 0x0112
# EXIF orientation -> the transpose that shows the image upright.
UPRIGHT = {
    2: Image.Transpose.FLIP_LEFT_RIGHT,
    3: Image.Transpose.ROTATE_180,
    4: Image.Transpose.FLIP_TOP_BOTTOM,
    5: Image.Transpose.TRANSPOSE,
    6: Image.Transpose.ROTATE_270,
    7: Image.Transpose.TRANSVERSE,
    8: Image.Transpose.ROTATE_90,
}

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
        code = "truncated" if "truncated" in str(exc).lower() else "decode_failed"
        raise InputError(code, f"unreadable image header: {exc}") from exc
    width, height = image.size
    if width < 1 or height < 1:
        raise InputError("decode_failed", f"image has no pixels ({width}x{height})")
    if width * height > limits.max_image_pixels:
        raise InputError(
            "image_too_large",
            f"{width}x{height} pixels exceeds the limit of {limits.max_image_pixels:,} pixels",
        )
    return image


@dataclass
class Decoded:
    """Decoded, EXIF-rotated pixels and the size of the full-resolution image.

    Draft mode decodes at 1/2, 1/4 or 1/8 scale and rounds the reduced size
    up, so the crop box is computed on the full size and scaled down exactly.
    """

    image: Image.Image
    full_size: tuple[int, int]
    draft_scale: float = 1.0

    def crop_box(self, spec: PreprocessSpec) -> tuple[float, float, float, float]:
        left, top, right, bottom = spec.crop_box(*self.full_size)
        scale = self.draft_scale
        return (left / scale, top / scale, right / scale, bottom / scale)


def load_pixels(image: Image.Image, spec: PreprocessSpec) -> Decoded:
    """Decode, at a reduced DCT scale when a JPEG is at least 2x what it needs.

    The draft target is twice the resize size so that a real antialiasing
    filter, not the DCT scaling, does the last 2x of the reduction; this keeps
    the output within 1/255 of a full-resolution decode.
    """
    width, height = image.size
    scale = 1.0
    if image.format == "JPEG":
        target = 2 * spec.resize_shorter
        drafted = image.draft(image.mode, (target, target))
        if drafted is not None:
            scale = width / drafted[1][2]
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            image.load()
            rotated = upright(image)
    except OSError as exc:
        if "truncated" in str(exc):
            raise InputError("truncated", f"image data is truncated: {exc}") from exc
        raise InputError("decode_failed", f"cannot decode image: {exc}") from exc
    except (SyntaxError, ValueError, EOFError, MemoryError) as exc:
        raise InputError("decode_failed", f"cannot decode image: {exc}") from exc
    swapped = rotated.size != image.size
    return Decoded(rotated, (height, width) if swapped else (width, height), scale)


def upright(image: Image.Image) -> Image.Image:
    """Apply EXIF orientation without rewriting the metadata, which a single
    mistyped tag would make fail (the pixels are still good)."""
    try:
        orientation = image.getexif().get(ORIENTATION_TAG, 1)
    except Exception:  # malformed EXIF: show the pixels as stored
        orientation = 1
    method = UPRIGHT.get(orientation) if isinstance(orientation, int) else None
    return image if method is None else image.transpose(method)


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


def transform(image: Image.Image, box: tuple[float, float, float, float],
              spec: PreprocessSpec) -> np.ndarray:
    """Resample the kept box straight to crop x crop (resize + crop in one step)."""
    cropped = image.resize((spec.crop, spec.crop), RESAMPLE[spec.interpolation], box=box)
    pixels = np.asarray(cropped)
    if pixels.ndim == 2:
        return np.ascontiguousarray(np.broadcast_to(pixels, (3, *pixels.shape)))
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def preprocess(data: bytes, spec: PreprocessSpec, limits: InputLimits) -> np.ndarray:
    """Encoded image bytes -> uint8 array of shape `spec.output_shape`."""
    decoded = load_pixels(open_image(data, limits), spec)
    return transform(to_rgb_or_l(decoded.image), decoded.crop_box(spec), spec)


class PillowBackend:
    """Decodes one image at a time; parallelism comes from the worker pool."""

    name = "pillow"
    fallbacks = 0  # Pillow is the last resort: it hands nothing on

    def __init__(self, spec: PreprocessSpec, limits: InputLimits) -> None:
        self.spec = spec
        self.limits = limits

    def setup(self) -> None:
        pass

    def run(self, images: Sequence[bytes]) -> list[Outcome]:
        return [self.run_one(data) for data in images]

    def run_one(self, data: bytes) -> Outcome:
        """The array for one image, or the InputError that names its problem."""
        try:
            return preprocess(data, self.spec, self.limits)
        except InputError as exc:
            return exc
        except Exception as exc:  # Pillow's plugins raise many types on hostile files
            return InputError("decode_failed", f"cannot decode image: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        pass
