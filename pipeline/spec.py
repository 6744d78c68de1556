"""The preprocessing spec: one value object that every backend implements."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal, get_args

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos"]
INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)

# Bumped whenever a backend changes what it produces for the same spec.
SPEC_VERSION = 1


@dataclass(frozen=True)
class PreprocessSpec:
    """Resize the shorter side, centre-crop a square, output uint8 RGB CHW.

    EXIF orientation is applied; alpha is composited over white; greyscale,
    palette, CMYK and 16-bit inputs become 8-bit RGB. Mean/std normalisation
    is not part of the spec: it runs batched on the inference device.
    """

    resize_shorter: int = 256
    crop: int = 224
    interpolation: Interpolation = "bilinear"

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, "
                             f"got {self.interpolation!r}")
        if self.crop < 1 or self.resize_shorter < self.crop:
            raise ValueError(
                f"need 1 <= crop <= resize_shorter, got crop={self.crop}, "
                f"resize_shorter={self.resize_shorter}"
            )

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (3, self.crop, self.crop)

    def digest(self) -> str:
        """A stable hex digest of everything that determines the output."""
        canonical = {**asdict(self), "version": SPEC_VERSION, "dtype": "uint8",
                     "layout": "CHW", "colour": "RGB", "alpha": "over-white"}
        blob = json.dumps(canonical, sort_keys=True).encode()
        return hashlib.blake2b(blob, digest_size=16).hexdigest()

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The source-pixel box that resize-shorter-then-centre-crop keeps.

        Matches torchvision's Resize(resize_shorter) + CenterCrop(crop), so the
        crop can be resampled straight from the source in one step.
        """
        shorter = min(width, height)
        resized_w = self.resize_shorter if width <= height else int(
            self.resize_shorter * width / shorter)
        resized_h = self.resize_shorter if height <= width else int(
            self.resize_shorter * height / shorter)
        scale_x, scale_y = resized_w / width, resized_h / height
        left = int(round((resized_w - self.crop) / 2.0))
        top = int(round((resized_h - self.crop) / 2.0))
        return (left / scale_x, top / scale_y,
                (left + self.crop) / scale_x, (top + self.crop) / scale_y)


@dataclass(frozen=True)
class InputLimits:
    """Caps checked before any pixel buffer is allocated."""

    max_file_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 100_000_000
