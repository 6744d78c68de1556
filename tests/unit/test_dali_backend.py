"""DaliBackend on real DALI CPU operators, checked against the pillow backend."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

pytest.importorskip("nvidia.dali")

from pipeline.errors import ConfigError, InputError  # noqa: E402
from pipeline.preprocess.dali import DaliBackend  # noqa: E402
from pipeline.preprocess.pillow import (  # noqa: E402
    PillowBackend,
    load_pixels,
    open_image,
    to_rgb_or_l,
    transform,
)
from pipeline.spec import InputLimits, PreprocessSpec  # noqa: E402
from tests.builders import damaged_copies  # noqa: E402
from tests.truncated_jpegs import (  # noqa: E402
    claimed_size,
    claiming,
    cut_with_end_marker,
    imagenet_photos,
    reencoded,
)

SAMPLES = Path(__file__).resolve().parents[2] / "samples"
SAMPLE_FILES = sorted(p for p in SAMPLES.iterdir() if p.suffix in (".jpg", ".png"))
SPEC = PreprocessSpec()
LIMITS = InputLimits()
ORIENTATION_TAG = 0x0112

def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def photo_like(width: int, height: int, seed: int = 0) -> Image.Image:
    """Smooth random structure (not symmetric), like a photo after upsampling."""
    rng = np.random.default_rng(seed)
    small = rng.integers(0, 256, (max(height // 16, 2), max(width // 16, 2), 3), np.uint8)
    return Image.fromarray(small).resize((width, height), Image.Resampling.BICUBIC)


def encode(image: Image.Image, fmt: str = "JPEG", **params: object) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, fmt, **params)
    return buffer.getvalue()


def pillow_without_draft(data: bytes, spec: PreprocessSpec = SPEC) -> np.ndarray:
    """The pillow backend's pipeline with a full-resolution JPEG decode."""
    full = PreprocessSpec(resize_shorter=10**6, crop=1)  # a draft target no JPEG exceeds
    decoded = load_pixels(open_image(data, LIMITS), full)
    return transform(to_rgb_or_l(decoded.image), spec.crop_box(*decoded.full_size), spec)


def pillow_outcomes(images: list[bytes], spec: PreprocessSpec = SPEC) -> list:
    return PillowBackend(spec, LIMITS).run(images)


@pytest.fixture
def backend():
    dali = DaliBackend(SPEC, LIMITS, device="cpu", num_threads=1, batch_size=4)
    dali.setup()
    yield dali
    dali.close()


def test_outputs_are_uint8_chw_in_order(backend: DaliBackend) -> None:
    sizes = [(320, 240), (240, 320), (1000, 260), (64, 48), (300, 300)]
    images = [encode(photo_like(w, h, seed=i)) for i, (w, h) in enumerate(sizes)]
    outcomes = backend.run(images)
    assert len(outcomes) == len(images)
    for out, ref in zip(outcomes, pillow_outcomes(images), strict=True):
        assert isinstance(out, np.ndarray)
        assert out.shape == SPEC.output_shape and out.dtype == np.uint8
        assert out.flags.c_contiguous
        assert mean_abs_diff(out, ref) <= 1
    assert backend.fallbacks == 0


def test_more_inputs_than_batch_size_are_chunked(backend: DaliBackend) -> None:
    images = [encode(photo_like(200 + 10 * i, 180, seed=i)) for i in range(10)]
    together = backend.run(images)
    one_by_one = [backend.run([data])[0] for data in images]
    for a, b in zip(together, one_by_one, strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.name)
def test_agrees_with_pillow_backend_on_samples(backend: DaliBackend, path: Path) -> None:
    data = path.read_bytes()
    (out,) = backend.run([data])
    (ref,) = pillow_outcomes([data])
    assert out.shape == ref.shape == SPEC.output_shape
    assert mean_abs_diff(out, ref) <= 2


@pytest.mark.parametrize("path", SAMPLE_FILES, ids=lambda p: p.name)
def test_matches_full_resolution_pillow_on_samples(backend: DaliBackend, path: Path) -> None:
    # Same geometry and filter as pillow: only decoder rounding differs (measured <= 0.2).
    data = path.read_bytes()
    (out,) = backend.run([data])
    assert mean_abs_diff(out, pillow_without_draft(data)) <= 0.5


@pytest.mark.parametrize("width", [2000, 3000])
def test_large_jpegs_match_full_resolution_pillow(backend: DaliBackend, width: int) -> None:
    source = Image.open(SAMPLES / "coffee.jpg").convert("RGB")
    big = source.resize((width, round(source.height * width / source.width)),
                        Image.Resampling.LANCZOS)
    data = encode(big, quality=90)
    (out,) = backend.run([data])
    assert mean_abs_diff(out, pillow_without_draft(data)) <= 0.5


@pytest.mark.parametrize("interpolation", ["nearest", "bilinear", "bicubic", "lanczos"])
def test_each_interpolation_matches_pillow(interpolation: str) -> None:
    spec = PreprocessSpec(interpolation=interpolation)
    data = (SAMPLES / "chelsea.jpg").read_bytes()  # 451x300: pillow does not draft
    dali = DaliBackend(spec, LIMITS)
    (out,) = dali.run([data])
    (ref,) = pillow_outcomes([data], spec)
    assert mean_abs_diff(out, ref) <= 0.5


def test_bad_inputs_fail_alone(backend: DaliBackend) -> None:
    good = [encode(photo_like(400, 300, seed=i)) for i in range(4)]
    whole = encode(photo_like(400, 300, seed=9))
    truncated = whole[: len(whole) // 2]
    noise = np.random.default_rng(1).integers(0, 256, 4096, np.uint8).tobytes()
    images = [good[0], good[1], truncated, noise, good[2], good[3]]
    outcomes = backend.run(images)
    codes = [getattr(out, "code", None) for out in outcomes]
    assert codes == [None, None, "truncated", "not_an_image", None, None]
    for out, ref in zip(outcomes, pillow_outcomes(images), strict=True):
        if isinstance(out, np.ndarray):
            assert mean_abs_diff(out, ref) <= 1
    assert backend.fallbacks == 1  # only the truncated JPEG reached DALI and failed
    # The pipeline was rebuilt after the failure and keeps working.
    (again,) = backend.run([good[0]])
    np.testing.assert_array_equal(again, outcomes[0])


def test_header_errors_never_reach_dali() -> None:
    dali = DaliBackend(SPEC, InputLimits(max_image_pixels=10_000))
    outcomes = dali.run([b"", encode(photo_like(200, 100)), encode(photo_like(50, 50))])
    assert [getattr(out, "code", None) for out in outcomes] == [
        "empty_file", "image_too_large", None]
    assert dali.fallbacks == 0


def _rgba() -> Image.Image:
    image = photo_like(300, 200).convert("RGBA")
    image.putalpha(Image.linear_gradient("L").resize(image.size))
    return image


SPECIAL_MODES = {
    "cmyk_jpeg": lambda: encode(photo_like(300, 200).convert("CMYK")),
    "rgba_png": lambda: encode(_rgba(), "PNG"),
    "palette_png": lambda: encode(photo_like(300, 200).convert("P"), "PNG"),
    "grey16_png": lambda: encode(photo_like(300, 200).convert("L").convert("I;16"), "PNG"),
}


@pytest.mark.parametrize("kind", SPECIAL_MODES)
def test_special_modes_go_to_pillow(backend: DaliBackend, kind: str) -> None:
    data = SPECIAL_MODES[kind]()
    (out,) = backend.run([data])
    (ref,) = pillow_outcomes([data])
    np.testing.assert_array_equal(out, ref)
    assert backend.fallbacks == 1


def test_greyscale_jpeg_is_decoded_by_dali(backend: DaliBackend) -> None:
    data = encode(photo_like(300, 200).convert("L"))
    (out,) = backend.run([data])
    (ref,) = pillow_outcomes([data])
    assert backend.fallbacks == 0
    assert mean_abs_diff(out, ref) <= 1


@pytest.mark.parametrize("orientation", range(1, 9))
def test_exif_orientation_matches_pillow(backend: DaliBackend, orientation: int) -> None:
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    data = encode(photo_like(400, 260, seed=3), exif=exif.tobytes())
    upright = encode(photo_like(400, 260, seed=3))
    out, plain = backend.run([data, upright])
    (ref,) = pillow_outcomes([data])
    assert backend.fallbacks == 0
    assert mean_abs_diff(out, ref) <= 1
    if orientation != 1:  # the tag really changed the picture
        assert mean_abs_diff(out, plain) > 10


@pytest.mark.parametrize("orientation", range(1, 9))
def test_jpeg_claiming_more_pixels_than_its_data_holds_is_truncated(
        backend: DaliBackend, orientation: int) -> None:
    # given a real JPEG, turned by its EXIF tag, and copies whose header claims
    # twice its width or 16 rows more than its data holds
    exif = Image.Exif()
    exif[ORIENTATION_TAG] = orientation
    data = reencoded((SAMPLES / "coffee.jpg").read_bytes(), exif=exif.tobytes())
    width, height = claimed_size(data)
    wider, taller = claiming(data, 2 * width, height), claiming(data, width, height + 16)
    # when they are decoded in one batch
    outcomes = backend.run([wider, data, taller])
    # then the edited ones are truncated, the real one is scored
    assert [getattr(out, "code", None) for out in outcomes] == ["truncated", None, "truncated"]


def test_jpeg_claiming_10000x10000_pixels_is_truncated(backend: DaliBackend) -> None:
    data = (SAMPLES / "coffee.jpg").read_bytes()
    (outcome,) = backend.run([claiming(data, 10_000, 10_000)])
    assert isinstance(outcome, InputError) and outcome.code == "truncated"


def test_jpeg_cut_in_half_is_truncated_even_with_an_end_marker(backend: DaliBackend) -> None:
    data = (SAMPLES / "coffee.jpg").read_bytes()
    outcomes = backend.run([data[: len(data) // 2], cut_with_end_marker(data)])
    assert [getattr(out, "code", None) for out in outcomes] == ["truncated", "truncated"]


def test_no_real_photograph_is_taken_for_truncated(backend: DaliBackend) -> None:
    # given the sample JPEGs and, where present, the 100 shared ImageNet photographs
    paths = [p for p in SAMPLE_FILES if p.suffix == ".jpg"] + imagenet_photos()
    # when DALI decodes them / then every one is scored, and at most one in
    # twenty went to pillow for a second look at its grey last pixel
    outcomes = backend.run([path.read_bytes() for path in paths])
    assert all(isinstance(out, np.ndarray) for out in outcomes)
    assert backend.fallbacks <= len(paths) // 20


def test_rejects_unknown_device() -> None:
    with pytest.raises(ConfigError):
        DaliBackend(SPEC, LIMITS, device="tpu")


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on damaged metadata
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF"])
def test_damaged_files_give_an_input_error_or_pixels_never_a_crash(backend: DaliBackend,
                                                                   fmt: str) -> None:
    # given 80 copies of a small image with bytes overwritten, some also cut short
    with Image.open(SAMPLES / "chelsea.jpg") as image:
        data = encode(image.convert("RGB").resize((64, 48)), fmt)
    damaged_files = damaged_copies(data)
    # when they are preprocessed as one batch
    outcomes = backend.run(damaged_files)
    # then each is an error with a code or a well-formed array; nothing raised
    assert len(outcomes) == len(damaged_files)
    for outcome in outcomes:
        if isinstance(outcome, InputError):
            assert outcome.code
        else:
            assert outcome.shape == (3, 224, 224) and outcome.dtype == np.uint8
