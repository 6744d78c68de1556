"""Decoding the crop's window only (preprocess.dali_roi_decode): the window's
geometry, and on DALI's CPU operators the same pixels as a whole decode, on
real photographs and every EXIF orientation."""

from __future__ import annotations

import io
import math
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("nvidia.dali")

from pipeline.preprocess import DecoderHints  # noqa: E402
from pipeline.preprocess.dali import DaliBackend, plan_job  # noqa: E402
from pipeline.preprocess.dali_roi import MOST, whole, window  # noqa: E402
from pipeline.preprocess.pillow import ORIENTATION_TAG  # noqa: E402
from pipeline.spec import InputLimits, PreprocessSpec  # noqa: E402
from tests.truncated_jpegs import (  # noqa: E402
    claimed_size,
    claiming,
    cut_with_end_marker,
    imagenet_photos,
)

SPEC, LIMITS = PreprocessSpec(), InputLimits()
SAMPLES = Path(__file__).resolve().parents[2] / "samples"
LEFT, TOP, RIGHT, BOTTOM = SPEC.region_box(4000, 3000, "centre")
CENTRE_OF_4000x3000 = (((TOP, LEFT), (BOTTOM, RIGHT)),)  # as (y, x) start and end


@pytest.mark.parametrize(("corner", "reaches"), [
    (0, "top left"), (1, "top right"), (2, "bottom left"), (3, "bottom right")])
def test_the_window_reaches_the_corner_of_the_last_stored_pixel(corner: int,
                                                                reaches: str) -> None:
    # given the crop box of a 4000x3000 photo, whose last stored pixel lands in `corner`
    (top, left), (height, width) = window(4000, 3000, CENTRE_OF_4000x3000, SPEC, corner)
    # then the window reaches that corner's two edges and keeps the margin elsewhere
    margin = 12 + 16  # bilinear's reach at a downscale of 11.7, and one JPEG block
    vertical, horizontal = reaches.split()
    assert (top, top + height) == ((0, math.ceil(BOTTOM) + margin) if vertical == "top"
                                   else (math.floor(TOP) - margin, 3000))
    assert (left, left + width) == ((0, math.ceil(RIGHT) + margin) if horizontal == "left"
                                    else (math.floor(LEFT) - margin, 4000))


def test_formats_without_a_last_pixel_check_and_large_windows_are_decoded_whole() -> None:
    assert window(4000, 3000, CENTRE_OF_4000x3000, SPEC, None) == whole(4000, 3000)
    # a square photo's crop box, reaching a corner, is over MOST of it
    square = (((16.0, 16.0), (240.0, 240.0)),)
    (_, _), (height, width) = window(256, 256, square, SPEC, 3)
    assert (height * width > MOST * 256 * 256) == ((height, width) == (256, 256))
    assert window(256, 256, square, SPEC, 3) == whole(256, 256)


def decoded(images: list[bytes], roi_decode: str) -> list[np.ndarray]:
    dali = DaliBackend(SPEC, LIMITS, batch_size=8, hints=DecoderHints(roi_decode=roi_decode))
    dali.setup()
    try:
        outcomes = dali.run(images)
    finally:
        dali.close()
    assert all(isinstance(out, np.ndarray) for out in outcomes)
    return outcomes  # type: ignore[return-value]


def large_photo(orientation: int = 1, mode: str = "RGB", **options: object) -> bytes:
    """A 1600x1200 JPEG made from a sample photograph, turned by its EXIF tag."""
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    buffer = io.BytesIO()
    with Image.open(SAMPLES / "chelsea.jpg") as image:
        image.convert(mode).resize((1600, 1200), Image.Resampling.BICUBIC).save(
            buffer, "JPEG", quality=90, exif=exif.tobytes(), **options)
    return buffer.getvalue()


def test_windows_give_the_whole_decodes_pixels_in_every_orientation() -> None:
    # given a large photo under each EXIF orientation, each decoded in a window
    images = [large_photo(orientation) for orientation in range(1, 9)]
    for data in images:
        job = plan_job(0, data, SPEC, LIMITS, windowed=True)
        assert job is not None and job.window is not None
        (_, _), (height, width) = job.window
        assert height * width < 0.9 * 1600 * 1200  # a real window, not the whole image
    # when DALI decodes them windowed and whole / then the crops agree to rounding
    for got, expected in zip(decoded(images, "on"), decoded(images, "off"), strict=True):
        assert int(np.abs(got.astype(np.int16) - expected).max()) <= 1


def test_windows_give_the_whole_decodes_pixels_in_every_jpeg_encoding() -> None:
    # given a large photo saved progressive, with each chroma subsampling, and grey
    images = [large_photo(progressive=True), large_photo(subsampling=0),
              large_photo(subsampling=1), large_photo(subsampling=2),
              large_photo(mode="L"), large_photo(mode="L", progressive=True)]
    # when DALI decodes them windowed and whole / then the crops agree to rounding
    for got, expected in zip(decoded(images, "on"), decoded(images, "off"), strict=True):
        assert int(np.abs(got.astype(np.int16) - expected).max()) <= 1


@pytest.mark.skipif(not imagenet_photos(), reason="needs ../shared/data/imagenet-val-100")
def test_windows_give_the_whole_decodes_pixels_on_real_photographs() -> None:
    # given the 100 ImageNet photographs and the samples
    photos = [path.read_bytes() for path in imagenet_photos()]
    photos += [path.read_bytes() for path in sorted(SAMPLES.glob("*.jpg"))]
    windowed = [plan_job(0, data, SPEC, LIMITS, windowed=True) for data in photos]
    assert sum(job is not None and job.window is not None
               and job.window[0] != (0, 0) for job in windowed) >= len(photos) // 2
    # when DALI decodes them windowed and whole / then the crops agree to rounding
    for got, expected in zip(decoded(photos, "on"), decoded(photos, "off"), strict=True):
        assert int(np.abs(got.astype(np.int16) - expected).max()) <= 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_a_large_jpeg_missing_its_last_rows_is_truncated_when_decoded_in_a_window(
        orientation: int) -> None:
    # given a large photo, turned by its EXIF tag, and copies whose stored data ends
    # a little early: cut (with and without an end marker), or claiming 16 more
    # rows than it holds, so that only pixels outside the crop box are missing
    data = large_photo(orientation)
    width, height = claimed_size(data)
    short = [data[: len(data) * 99 // 100], cut_with_end_marker(data, 0.99),
             claiming(data, width, height + 16)]
    # when DALI decodes them in their windows
    dali = DaliBackend(SPEC, LIMITS, batch_size=4, hints=DecoderHints(roi_decode="on"))
    dali.setup()
    try:
        outcomes = dali.run([*short, data])
    finally:
        dali.close()
    # then the short ones are truncated, as Pillow says, and the whole one is scored
    assert [getattr(out, "code", None) for out in outcomes] == ["truncated"] * 3 + [None]
