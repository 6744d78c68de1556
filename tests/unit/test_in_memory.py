"""Items a program holds (paths, bytes, PIL images, arrays) as Jobs: an image or
an array decodes to exactly the pixels a lossless file of it would."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.config import load_settings
from pipeline.preprocess.pillow import preprocess
from pipeline.sources.in_memory import to_job
from pipeline.spec import InputLimits

SETTINGS = load_settings()
SPEC, LIMITS = SETTINGS.preprocess.spec(), SETTINGS.preprocess.limits()
SAMPLES = Path(__file__).resolve().parents[2] / "samples"


def file_bytes(image: Image.Image, fmt: str = "PNG") -> bytes:
    out = io.BytesIO()
    image.save(out, fmt)
    return out.getvalue()


def preprocessed(job_data: bytes | None) -> np.ndarray:
    assert job_data is not None
    return preprocess(job_data, SPEC, LIMITS)


@pytest.fixture(scope="module")
def photo() -> Image.Image:
    return Image.open(SAMPLES / "camera.png").convert("RGB").resize((320, 240))


def with_transparency(image: Image.Image) -> Image.Image:
    palette = image.convert("P")
    palette.info["transparency"] = 0
    return palette


@pytest.mark.parametrize("make", [
    lambda im: im, lambda im: im.convert("L"), lambda im: im.convert("RGBA"),
    lambda im: im.convert("LA"), lambda im: im.convert("P"), lambda im: im.convert("1"),
    lambda im: im.convert("I;16"), with_transparency,
], ids=["RGB", "L", "RGBA", "LA", "P", "1", "I;16", "P+transparency"])
def test_a_pil_image_decodes_to_the_pixels_of_a_png_of_it(photo: Image.Image, make) -> None:
    image = make(photo)
    job = to_job(image, 0, LIMITS)
    assert job.error is None and job.path == "<image #0>"
    assert np.array_equal(preprocessed(job.data), preprocess(file_bytes(image), SPEC, LIMITS))


def test_cmyk_decodes_to_the_pixels_of_a_tiff_of_it(photo: Image.Image) -> None:
    image = photo.convert("CMYK")
    job = to_job(image, 0, LIMITS)
    assert np.array_equal(preprocessed(job.data),
                          preprocess(file_bytes(image, "TIFF"), SPEC, LIMITS))


@pytest.mark.parametrize("channels", [None, 1, 3, 4])
def test_an_array_decodes_to_the_pixels_of_a_png_of_it(photo: Image.Image,
                                                       channels: int | None) -> None:
    rgb = np.asarray(photo)
    pixels = {None: rgb[:, :, 0], 1: rgb[:, :, :1], 3: rgb[::2, ::2],  # a strided view
              4: np.dstack([rgb, np.full(rgb.shape[:2], 90, np.uint8)])}[channels]
    as_image = Image.fromarray(pixels[:, :, 0] if channels == 1 else pixels)
    job = to_job(pixels, 3, LIMITS)
    assert job.error is None and job.path == "<array #3>"
    assert np.array_equal(preprocessed(job.data),
                          preprocess(file_bytes(as_image), SPEC, LIMITS))


def test_an_image_is_turned_upright_by_its_exif_orientation_as_a_file_is() -> None:
    photo = Image.open(SAMPLES / "coffee.jpg")
    exif = photo.getexif()
    exif[0x0112] = 6  # rotated 90 degrees
    data = file_bytes_with_exif(photo, exif)
    job = to_job(Image.open(io.BytesIO(data)), 0, LIMITS)
    assert np.array_equal(preprocessed(job.data), preprocess(data, SPEC, LIMITS))


def file_bytes_with_exif(image: Image.Image, exif: Image.Exif) -> bytes:
    out = io.BytesIO()
    image.save(out, "PNG", exif=exif)
    return out.getvalue()


def test_the_same_pixels_give_the_same_bytes_so_the_cache_knows_them(
        photo: Image.Image) -> None:
    rgba = photo.convert("RGBA")
    assert to_job(rgba, 0, LIMITS).data == to_job(rgba.copy(), 1, LIMITS).data
    assert to_job(photo, 0, LIMITS).data == to_job(np.asarray(photo), 1, LIMITS).data


def test_paths_and_bytes_pass_through() -> None:
    data = (SAMPLES / "coffee.jpg").read_bytes()
    assert to_job(SAMPLES / "coffee.jpg", 0, LIMITS).path == str(SAMPLES / "coffee.jpg")
    assert to_job("x/y.jpg", 0, LIMITS).data is None
    for item in (data, bytearray(data), memoryview(data)):
        job = to_job(item, 7, LIMITS)
        assert job.path == "<bytes #7>" and job.data == data and job.error is None
        assert type(job.data) is bytes  # what the workers are sent: a memoryview cannot be


@pytest.mark.parametrize(("item", "code", "named"), [
    (42, "not_an_image", "<int #0>"),
    (np.zeros((4, 4, 3), np.float32), "not_an_image", "<array #0>"),
    (np.zeros((4, 4, 2), np.uint8), "not_an_image", "<array #0>"),
    (np.zeros((4,), np.uint8), "not_an_image", "<array #0>"),
    (np.zeros((0, 4, 3), np.uint8), "decode_failed", "<array #0>"),
    (np.zeros((200, 200), np.uint8), "image_too_large", "<array #0>"),
    (Image.new("RGB", (200, 200)), "image_too_large", "<image #0>"),
    (b"x" * 2001, "file_too_large", "<bytes #0>"),
])
def test_a_bad_item_is_a_job_carrying_its_error(item: object, code: str, named: str) -> None:
    job = to_job(item, 0, InputLimits(max_file_bytes=2000, max_image_pixels=10_000))
    assert job.error is not None and (job.error.code, job.path) == (code, named)
    assert job.data is None


def test_a_truncated_image_file_opened_lazily_is_an_error_job() -> None:
    data = (SAMPLES / "camera.png").read_bytes()
    job = to_job(Image.open(io.BytesIO(data[: len(data) // 2])), 0, LIMITS)
    assert job.error is not None and job.error.code in ("truncated", "decode_failed")
