"""Decoding only the part of a JPEG the crop needs (preprocess.dali_roi_decode).

The box that resize-shorter-then-centre-crop keeps is about 57% of a 4:3
photo. DALI's image_slice decodes a window of the file with the decoder's ROI
support (libjpeg-turbo's, nvJPEG's): on DALI's CPU decoder that made
12-megapixel photos decode 1.4-1.6x faster, and ImageNet-size photos no
faster (benchmarks/README.md, "Decoding the crop's window").

The window is the regions' boxes widened by the resampling filter's reach
(its radius times the downscale), so that the pixels resampled from it are
a whole decode's, plus one JPEG block (16 pixels) of slack: the tests find
a whole decode's pixels (within 1/255) without the slack too, on real
photographs, in every orientation and every JPEG encoding. It reaches
the corner of the upright image where the last pixel stored in the file
lands: the pixel whose mid-grey tells a file cut short (dali.py), so that
a truncated JPEG is still found as one. Other formats are decoded whole,
and so is an image whose window would be most of it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from pipeline.spec import PreprocessSpec

BLOCK = 16  # pixels of slack: the largest JPEG block (MCU) side, 4:2:0 chroma
REACH = {"nearest": 1, "bilinear": 1, "bicubic": 2, "lanczos": 3}  # filter radius
MOST = 0.9  # a window over this share of the image: decode it whole

Roi = tuple[tuple[float, float], tuple[float, float]]  # (y, x) start, (y, x) end
Window = tuple[tuple[int, int], tuple[int, int]]  # (y, x) anchor, (height, width)


def whole(width: int, height: int) -> Window:
    return ((0, 0), (height, width))


def window(width: int, height: int, rois: Sequence[Roi], spec: PreprocessSpec,
           last_corner: int | None) -> Window:
    """The part of the upright image (width x height) to decode for `rois`, which
    reaches `last_corner` (dali.CORNERS' index of the last stored pixel; None for
    a format decoded whole)."""
    if last_corner is None:
        return whole(width, height)
    crop_h, crop_w = spec.crop_size
    downscale = max(max((end[0] - start[0]) / crop_h, (end[1] - start[1]) / crop_w)
                    for start, end in rois)
    margin = math.ceil(REACH[spec.interpolation] * max(1.0, downscale)) + BLOCK
    top = max(0, math.floor(min(start[0] for start, _ in rois)) - margin)
    left = max(0, math.floor(min(start[1] for start, _ in rois)) - margin)
    bottom = min(height, math.ceil(max(end[0] for _, end in rois)) + margin)
    right = min(width, math.ceil(max(end[1] for _, end in rois)) + margin)
    low, rightmost = last_corner in (2, 3), last_corner in (1, 3)  # CORNERS' order
    top, bottom = (top, height) if low else (0, bottom)
    left, right = (left, width) if rightmost else (0, right)
    if (bottom - top) * (right - left) > MOST * width * height:
        return whole(width, height)
    return ((top, left), (bottom - top, right - left))


def within(rois: Sequence[Roi], decoded: Window) -> tuple[Roi, ...]:
    """`rois` in the coordinates of the decoded window."""
    (top, left), _ = decoded
    return tuple(((start[0] - top, start[1] - left), (end[0] - top, end[1] - left))
                 for start, end in rois)
