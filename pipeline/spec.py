"""The preprocessing spec: one value object that every backend implements,
and the test-time augmentation views cut from one decoded image."""

from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass
from typing import Literal, Optional, get_args

Interpolation = Literal["nearest", "bilinear", "bicubic", "lanczos", "box", "hamming"]
INTERPOLATIONS: tuple[str, ...] = get_args(Interpolation)

# Bumped whenever a backend changes what it produces for the same spec.
SPEC_VERSION = 1

# Test-time augmentation: how many views of one image the model scores; the
# prediction is the mean of their softmax probabilities.
TtaMode = Literal["none", "hflip", "five_crop", "ten_crop"]
TTA_VIEWS: dict[str, int] = {"none": 1, "hflip": 2, "five_crop": 5, "ten_crop": 10}
# Regions of the resized image, in torchvision's FiveCrop order.
FIVE_REGIONS = ("top_left", "top_right", "bottom_left", "bottom_right", "centre")
# Bumped whenever the views of a mode change (their order, geometry or mirroring).
VIEWS_VERSION = 1


@dataclass(frozen=True)
class View:
    """One view: a crop-sized region of the resized image, mirrored or not."""

    region: str  # "centre", or a corner in FIVE_REGIONS
    mirrored: bool = False


def tta_views(mode: str) -> tuple[View, ...]:
    """The views of `mode`, in the order they are stacked and scored.

    none: the centre crop. hflip: the centre crop, then its mirror image.
    five_crop: the four corners (top left, top right, bottom left, bottom
    right) and the centre, as torchvision's FiveCrop. ten_crop: those five,
    then the mirror image of each, in the same order.
    """
    if mode == "none":
        return (View("centre"),)
    if mode == "hflip":
        return (View("centre"), View("centre", True))
    five = tuple(View(region) for region in FIVE_REGIONS)
    if mode == "five_crop":
        return five
    if mode == "ten_crop":
        return five + tuple(View(view.region, True) for view in five)
    raise ValueError(f"unknown tta mode {mode!r}; choose one of {', '.join(TTA_VIEWS)}")


def views_digest(spec_digest: str, mode: str) -> str:
    """The digest of what a spec makes under a TTA mode: the spec's own for
    "none" (one view, as before TTA existed), else one that adds the view set.
    Tensor and result cache keys use it, so the views of one mode never serve
    another."""
    if mode == "none":
        return spec_digest
    tta_views(mode)  # refuses an unknown mode
    blob = f"{spec_digest}:views:{mode}:v{VIEWS_VERSION}".encode()
    return hashlib.blake2b(blob, digest_size=16).hexdigest()


@dataclass(frozen=True)
class PreprocessSpec:
    """Resize the shorter side, centre-crop `crop` x `crop_width` (height x
    width; square when `crop_width` is None), output uint8 RGB CHW.

    EXIF orientation is applied; alpha is composited over white; greyscale,
    palette, CMYK and 16-bit inputs become 8-bit RGB. Mean/std normalisation
    is not part of the spec: it runs batched on the inference device.
    """

    resize_shorter: int = 256
    crop: int = 224
    interpolation: Interpolation = "bilinear"
    crop_width: Optional[int] = None  # None: a square crop, `crop` wide

    def __post_init__(self) -> None:
        if self.interpolation not in INTERPOLATIONS:
            raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, "
                             f"got {self.interpolation!r}")
        height, width = self.crop_size
        if min(height, width) < 1 or self.resize_shorter < max(height, width):
            raise ValueError(
                f"need 1 <= crop <= resize_shorter, got crop={height}x{width}, "
                f"resize_shorter={self.resize_shorter}"
            )

    @property
    def crop_size(self) -> tuple[int, int]:
        """(height, width) of the crop."""
        return self.crop, self.crop if self.crop_width is None else self.crop_width

    @property
    def output_shape(self) -> tuple[int, int, int]:
        return (3, *self.crop_size)

    def digest(self) -> str:
        """A stable hex digest of everything that determines the output."""
        fields = asdict(self)
        if self.crop_width is None or self.crop_width == self.crop:
            # Square: the same digest as before non-square crops existed.
            fields.pop("crop_width")
        canonical = {**fields, "version": SPEC_VERSION, "dtype": "uint8",
                     "layout": "CHW", "colour": "RGB", "alpha": "over-white"}
        blob = json.dumps(canonical, sort_keys=True).encode()
        return hashlib.blake2b(blob, digest_size=16).hexdigest()

    def describe(self) -> str:
        """The recipe in words: "resize 256, crop 224, bilinear"."""
        height, width = self.crop_size
        crop = str(height) if height == width else f"{height}x{width}"
        return f"resize {self.resize_shorter}, crop {crop}, {self.interpolation}"

    def crop_box(self, width: int, height: int) -> tuple[float, float, float, float]:
        """The source-pixel box that resize-shorter-then-centre-crop keeps.

        Matches torchvision's Resize(resize_shorter) + CenterCrop(crop), so the
        crop can be resampled straight from the source in one step.
        """
        return self.region_box(width, height, "centre")

    def region_box(self, width: int, height: int,
                   region: str) -> tuple[float, float, float, float]:
        """The source-pixel box of one crop-sized region of the resized image:
        its centre (torchvision's CenterCrop) or a corner (FiveCrop's)."""
        shorter = min(width, height)
        resized_w = self.resize_shorter if width <= height else int(
            self.resize_shorter * width / shorter)
        resized_h = self.resize_shorter if height <= width else int(
            self.resize_shorter * height / shorter)
        scale_x, scale_y = resized_w / width, resized_h / height
        crop_h, crop_w = self.crop_size
        if region == "centre":
            left = int(round((resized_w - crop_w) / 2.0))
            top = int(round((resized_h - crop_h) / 2.0))
        elif region in FIVE_REGIONS:
            left = 0 if region.endswith("left") else resized_w - crop_w
            top = 0 if region.startswith("top") else resized_h - crop_h
        else:
            raise ValueError(f"unknown region {region!r}")
        return (left / scale_x, top / scale_y,
                (left + crop_w) / scale_x, (top + crop_h) / scale_y)

    def view_boxes(self, width: int, height: int,
                   mode: str) -> list[tuple[tuple[float, float, float, float], bool]]:
        """(source box, mirrored) for every view of `mode`, in order."""
        return [(self.region_box(width, height, view.region), view.mirrored)
                for view in tta_views(mode)]


@dataclass(frozen=True)
class InputLimits:
    """Caps checked before any pixel buffer is allocated."""

    max_file_bytes: int = 64 * 1024 * 1024
    max_image_pixels: int = 100_000_000
