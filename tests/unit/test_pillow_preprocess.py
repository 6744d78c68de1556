"""The Pillow backend: every input mode becomes uint8 RGB CHW, bad inputs get a code."""

from __future__ import annotations

import io
import struct
import tracemalloc

import numpy as np
import psutil
import pytest
from PIL import Image, ImageFile

from pipeline.errors import InputError
from pipeline.preprocess.pillow import PillowBackend, preprocess
from pipeline.spec import InputLimits, PreprocessSpec
from tests.builders import damaged_copies, png_claiming
from tests.truncated_jpegs import (
    claimed_size,
    claiming,
    cut_with_end_marker,
    imagenet_photos,
    reencoded,
)

RED = (200, 30, 40)
GREEN = (20, 180, 90)
BLUE = (30, 40, 210)
ORIENTATION = 0x0112


def mean_abs_diff(a: np.ndarray, b: np.ndarray) -> float:
    return float(np.abs(a.astype(np.int16) - b.astype(np.int16)).mean())


def left_pixel(out: np.ndarray) -> np.ndarray:
    """A pixel well inside the left half of a (3, 224, 224) output."""
    return out[:, 112, 30].astype(int)


def right_pixel(out: np.ndarray) -> np.ndarray:
    return out[:, 112, 194].astype(int)


def assert_colour(pixel: np.ndarray, colour: tuple[int, ...], tolerance: int = 3) -> None:
    assert np.abs(pixel - np.array(colour)).max() <= tolerance, (pixel.tolist(), colour)


Colour = int | tuple[int, ...]


def halves(width: int, height: int, left: Colour, right: Colour,
           mode: str = "RGB") -> Image.Image:
    """An image whose left half is `left` and right half is `right`."""
    image = Image.new(mode, (width, height), left)
    image.paste(right, (width // 2, 0, width, height))
    return image


def expect_code(data: bytes, code: str, limits: InputLimits | None = None) -> InputError:
    with pytest.raises(InputError) as caught:
        preprocess(data, PreprocessSpec(), limits or InputLimits())
    assert caught.value.code == code, caught.value.message
    return caught.value


# --- output format ----------------------------------------------------------


def test_output_is_uint8_chw_and_c_contiguous(samples_dir, spec, limits):
    # given a sample photograph
    data = (samples_dir / "chelsea.jpg").read_bytes()

    # when it is preprocessed
    out = preprocess(data, spec, limits)

    # then it is a C-contiguous uint8 (3, 224, 224) array
    assert out.shape == (3, 224, 224)
    assert out.dtype == np.uint8
    assert out.flags.c_contiguous


def test_output_shape_follows_a_non_default_spec(samples_dir, limits):
    out = preprocess((samples_dir / "coffee.jpg").read_bytes(), PreprocessSpec(64, 48), limits)
    assert out.shape == (3, 48, 48)
    assert out.flags.c_contiguous


def test_channels_are_in_rgb_order(encode, spec, limits):
    # given a pure-blue image (a BGR mix-up would put 210 in channel 0)
    data = encode(Image.new("RGB", (50, 40), BLUE))

    # when / then
    assert_colour(left_pixel(preprocess(data, spec, limits)), BLUE, tolerance=0)


@pytest.mark.parametrize("fmt", ["PNG", "BMP", "TIFF", "PPM"])
def test_lossless_formats_give_the_same_pixels(samples_dir, encode, spec, limits, fmt):
    # given one photograph saved losslessly in several formats
    with Image.open(samples_dir / "chelsea.jpg") as image:
        rgb = image.convert("RGB")
    reference = preprocess(encode(rgb, "PNG"), spec, limits)

    # when each is preprocessed
    out = preprocess(encode(rgb, fmt), spec, limits)

    # then the pixels are identical
    np.testing.assert_array_equal(out, reference)


# --- colour modes -----------------------------------------------------------


def test_greyscale_becomes_three_equal_channels(encode, spec, limits):
    # given an L image with a dark left and a light right half
    data = encode(halves(100, 80, 40, 220, mode="L"))

    # when
    out = preprocess(data, spec, limits)

    # then every channel holds the grey value
    assert out.shape == (3, 224, 224)
    np.testing.assert_array_equal(out[0], out[1])
    np.testing.assert_array_equal(out[0], out[2])
    assert_colour(left_pixel(out), (40, 40, 40), tolerance=0)
    assert_colour(right_pixel(out), (220, 220, 220), tolerance=0)


def test_bilevel_mode_1_becomes_black_and_white(encode, spec, limits):
    # given a mode "1" image: black left, white right
    image = halves(100, 80, 0, 255, mode="L").convert("1", dither=Image.Dither.NONE)
    assert image.mode == "1"

    # when
    out = preprocess(encode(image), spec, limits)

    # then
    assert_colour(left_pixel(out), (0, 0, 0), tolerance=0)
    assert_colour(right_pixel(out), (255, 255, 255), tolerance=0)


def test_palette_image_keeps_its_colours(encode, spec, limits):
    # given a palette ("P") image with two colours
    image = halves(100, 80, RED, GREEN).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    assert image.mode == "P"

    # when
    out = preprocess(encode(image), spec, limits)

    # then
    assert_colour(left_pixel(out), RED)
    assert_colour(right_pixel(out), GREEN)


def test_palette_transparency_is_composited_over_white(encode, spec, limits):
    # given a palette PNG whose left colour is the transparent index
    image = halves(100, 80, RED, GREEN).convert("P", palette=Image.Palette.ADAPTIVE, colors=4)
    transparent_index = image.getpixel((10, 10))
    data = encode(image, "PNG", transparency=transparent_index)
    assert "transparency" in Image.open(io.BytesIO(data)).info

    # when
    out = preprocess(data, spec, limits)

    # then the transparent side is white and the opaque side keeps its colour
    assert_colour(left_pixel(out), (255, 255, 255), tolerance=0)
    assert_colour(right_pixel(out), GREEN)


def test_rgba_transparent_pixels_become_white_and_opaque_ones_keep_their_colour(
        encode, spec, limits):
    # given an RGBA image: left fully transparent (black underneath), right opaque green
    image = halves(100, 80, (0, 0, 0, 0), (*GREEN, 255), mode="RGBA")

    # when
    out = preprocess(encode(image), spec, limits)

    # then
    assert_colour(left_pixel(out), (255, 255, 255), tolerance=0)
    assert_colour(right_pixel(out), GREEN, tolerance=0)


def test_rgba_half_transparent_pixels_blend_with_white(encode, spec, limits):
    # given an opaque-black left half and a 50%-transparent black right half
    image = halves(100, 80, (0, 0, 0, 255), (0, 0, 0, 128), mode="RGBA")

    # when
    out = preprocess(encode(image), spec, limits)

    # then black over white at alpha 128/255 is mid-grey
    assert_colour(left_pixel(out), (0, 0, 0), tolerance=0)
    assert_colour(right_pixel(out), (127, 127, 127), tolerance=2)


def test_la_transparent_pixels_become_white(encode, spec, limits):
    # given a greyscale+alpha image: left transparent, right opaque grey 50
    image = halves(100, 80, (0, 0), (50, 255), mode="LA")

    # when
    out = preprocess(encode(image), spec, limits)

    # then
    assert_colour(left_pixel(out), (255, 255, 255), tolerance=0)
    assert_colour(right_pixel(out), (50, 50, 50), tolerance=0)


def test_cmyk_jpeg_colours_are_close_to_the_rgb_source(encode, spec, limits):
    # given the same two-colour picture as an RGB and as a CMYK JPEG
    rgb = halves(100, 80, RED, GREEN)
    cmyk_data = encode(rgb.convert("CMYK"), "JPEG", quality=95)
    assert Image.open(io.BytesIO(cmyk_data)).mode == "CMYK"

    # when the CMYK one is preprocessed
    out = preprocess(cmyk_data, spec, limits)

    # then its colours are those of the RGB source
    assert_colour(left_pixel(out), RED, tolerance=8)
    assert_colour(right_pixel(out), GREEN, tolerance=8)


def test_sixteen_bit_greyscale_png_is_scaled_to_eight_bits(encode, spec, limits):
    # given a 16-bit greyscale PNG: 65535 on the left, 32768 on the right
    wide = np.zeros((80, 100), dtype=np.uint16)
    wide[:, :50] = 65535
    wide[:, 50:] = 32768
    data = encode(Image.fromarray(wide))
    assert Image.open(io.BytesIO(data)).mode.startswith("I;16")

    # when
    out = preprocess(data, spec, limits)

    # then the values are scaled by 1/257 (not clipped to 255, not wrapped)
    assert_colour(left_pixel(out), (255, 255, 255), tolerance=0)
    assert_colour(right_pixel(out), (128, 128, 128), tolerance=1)


def test_sixteen_bit_greyscale_keeps_its_gradient(encode, spec, limits):
    # given a 16-bit horizontal ramp over the full range
    ramp = np.tile(np.linspace(0, 65535, 256).astype(np.uint16), (256, 1))
    data = encode(Image.fromarray(ramp))

    # when
    out = preprocess(data, spec, limits)

    # then the 8-bit output still rises from dark to light across the crop
    row = out[0, 112].astype(int)
    assert np.all(np.diff(row) >= 0)
    assert row[0] < 30 and row[-1] > 225


# --- EXIF orientation -------------------------------------------------------


def _with_orientation(encode, image: Image.Image, orientation: int, **options) -> bytes:
    exif = Image.Exif()
    exif[ORIENTATION] = orientation
    return encode(image, "JPEG", quality=95, exif=exif.tobytes(), **options)


@pytest.mark.parametrize(("orientation", "turn", "top", "bottom"), [
    # 6: rotate 90 degrees clockwise to display; the left side ends up on top
    (6, Image.Transpose.ROTATE_270, RED, BLUE),
    # 8: rotate 90 degrees counter-clockwise; the left side ends up at the bottom
    (8, Image.Transpose.ROTATE_90, BLUE, RED),
])
def test_exif_orientation_is_applied(encode, spec, limits, orientation, turn, top, bottom):
    # given a wide red|blue JPEG tagged with an EXIF orientation
    stored = halves(200, 100, RED, BLUE)
    data = _with_orientation(encode, stored, orientation)
    # and the same picture already turned upright, saved without a tag
    upright_data = encode(stored.transpose(turn), "JPEG", quality=95)

    # when both are preprocessed
    out = preprocess(data, spec, limits)
    reference = preprocess(upright_data, spec, limits)

    # then the tagged image is shown upright: the colours are on top and bottom
    assert_colour(out[:, 30, 112].astype(int), top, tolerance=10)
    assert_colour(out[:, 194, 112].astype(int), bottom, tolerance=10)
    assert mean_abs_diff(out, reference) <= 2.0


def test_exif_orientation_is_applied_to_a_draft_decoded_jpeg(encode, spec, limits, large_photo):
    # given a large photograph stored sideways with orientation 6
    data = _with_orientation(encode, large_photo, 6)
    upright = large_photo.transpose(Image.Transpose.ROTATE_270)
    upright_data = encode(upright, "JPEG", quality=95)

    # when both are preprocessed
    out = preprocess(data, spec, limits)
    reference = preprocess(upright_data, spec, limits)

    # then they agree
    assert mean_abs_diff(out, reference) <= 2.0


def _tiff_ifd(entries: list[tuple[int, int, int, bytes]]) -> bytes:
    """Big-endian TIFF header + one IFD of (tag, type, count, inline value) entries."""
    out = b"MM\x00\x2a" + struct.pack(">I", 8) + struct.pack(">H", len(entries))
    for tag, kind, count, value in entries:
        out += struct.pack(">HHI", tag, kind, count) + value.ljust(4, b"\0")
    return out + struct.pack(">I", 0)


@pytest.mark.parametrize("odd_tag", [
    (0x011A, 2, 4, b"EOS\0"),  # XResolution (a RATIONAL tag) stored as ASCII
    (0x0100, 2, 4, b"abc\0"),  # ImageWidth (a SHORT/LONG tag) stored as ASCII
], ids=["rational-as-text", "integer-as-text"])
def test_jpeg_with_a_mistyped_exif_tag_is_still_scored_upright(encode, spec, limits, odd_tag):
    # given a sound red|blue JPEG with orientation 6 whose EXIF also holds a tag
    # written with the wrong type (seen in the wild from buggy camera firmware)
    exif = _tiff_ifd([odd_tag, (ORIENTATION, 3, 1, struct.pack(">H", 6))])
    data = encode(halves(200, 100, RED, BLUE), "JPEG", quality=95, exif=b"Exif\0\0" + exif)
    assert Image.open(io.BytesIO(data)).getexif()[ORIENTATION] == 6

    # when the backend preprocesses it
    (outcome,) = PillowBackend(spec, limits).run([data])

    # then the pixels are scored, turned upright like any orientation-6 photo
    assert isinstance(outcome, np.ndarray), outcome
    assert_colour(outcome[:, 30, 112].astype(int), RED, tolerance=10)
    assert_colour(outcome[:, 194, 112].astype(int), BLUE, tolerance=10)


# --- sizes ------------------------------------------------------------------


def test_large_jpeg_draft_decode_agrees_with_full_decode(encode, spec, limits, large_photo):
    # given a 4000x3000 JPEG photograph
    data = encode(large_photo, "JPEG", quality=90)

    # when it is preprocessed (draft mode decodes it at a reduced DCT scale)
    out = preprocess(data, spec, limits)

    # then it agrees with a full-resolution decode and the same transform
    # (the fully decoded pixels, handed over as an uncompressed BMP: no draft mode)
    with Image.open(io.BytesIO(data)) as full:
        full.load()
        assert full.size == (4000, 3000)
        reference = preprocess(encode(full, "BMP"), spec, limits)
    assert mean_abs_diff(out, reference) <= 2.0


def test_valid_8000x6000_jpeg_is_accepted(encode, spec, limits, large_photo):
    # given a 48-megapixel JPEG (under the default 100-megapixel cap)
    data = encode(large_photo.resize((8000, 6000), Image.Resampling.NEAREST), "JPEG",
                  quality=85)

    # when
    out = preprocess(data, spec, limits)

    # then it is preprocessed like any other photo
    assert out.shape == (3, 224, 224)
    assert out.std() > 10  # a real picture, not a flat fill


@pytest.mark.parametrize("size", [(1, 1), (8, 8), (2000, 3), (3, 2000)],
                         ids=lambda size: f"{size[0]}x{size[1]}")
def test_tiny_and_thin_images_work(encode, spec, limits, size):
    # given a tiny or very thin solid-colour image
    data = encode(Image.new("RGB", size, BLUE))

    # when
    out = preprocess(data, spec, limits)

    # then the output is the full crop, filled with that colour
    assert out.shape == (3, 224, 224)
    assert np.abs(out.astype(int) - np.array(BLUE).reshape(3, 1, 1)).max() <= 1


def test_thin_image_keeps_its_centre(encode, spec, limits):
    # given a 2000x3 strip, red except for blue in the middle 20 columns
    strip = Image.new("RGB", (2000, 3), RED)
    strip.paste(BLUE, (990, 0, 1010, 3))

    # when
    out = preprocess(encode(strip), spec, limits)

    # then the centre crop (about 5 source columns wide) is blue
    assert_colour(out[:, 112, 112].astype(int), BLUE, tolerance=1)


# --- errors -----------------------------------------------------------------


def test_zero_bytes_is_empty_file():
    expect_code(b"", "empty_file")


@pytest.mark.parametrize("seed", range(5))
def test_random_bytes_are_not_an_image(seed):
    expect_code(np.random.default_rng(seed).bytes(4096), "not_an_image")


def test_text_file_is_not_an_image(tmp_path):
    # given a text file on disk
    path = tmp_path / "notes.jpg"
    path.write_text("these are my holiday notes\n" * 100, encoding="utf-8")

    # when / then
    expect_code(path.read_bytes(), "not_an_image")


@pytest.mark.parametrize("fraction", [0.5, 0.9])
def test_truncated_jpeg_is_truncated(samples_dir, fraction):
    # given the first part of a valid JPEG
    data = (samples_dir / "coffee.jpg").read_bytes()

    # when / then
    expect_code(data[: int(len(data) * fraction)], "truncated")


JPEG_ENCODINGS = {"baseline": {}, "progressive": {"progressive": True},
                  "restart markers": {"restart_marker_rows": 1}, "greyscale": {"grey": True}}


def sample_jpeg(samples_dir, encoding: str) -> bytes:
    """coffee.jpg as it is (baseline) or saved again with `encoding`'s options."""
    data = (samples_dir / "coffee.jpg").read_bytes()
    options = dict(JPEG_ENCODINGS[encoding])
    if options.pop("grey", False):
        with Image.open(io.BytesIO(data)) as image:
            buffer = io.BytesIO()
            image.convert("L").save(buffer, "JPEG", quality=90)
            return buffer.getvalue()
    return reencoded(data, **options) if options else data


@pytest.mark.parametrize("encoding", JPEG_ENCODINGS)
@pytest.mark.parametrize("claim", ["10000x10000", "twice as wide", "16 rows more"])
def test_jpeg_claiming_more_pixels_than_its_data_holds_is_truncated(samples_dir, encoding,
                                                                    claim):
    # given a real 600x400 JPEG whose header was edited to claim more pixels
    data = sample_jpeg(samples_dir, encoding)
    width, height = claimed_size(data)
    claimed = {"10000x10000": (10_000, 10_000), "twice as wide": (2 * width, height),
               "16 rows more": (width, height + 16)}[claim]

    # when / then: the decoder ran out of data, so it is truncated, not scored
    expect_code(claiming(data, *claimed), "truncated")


@pytest.mark.parametrize("encoding", ["baseline", "restart markers", "greyscale"])
def test_jpeg_cut_in_half_is_truncated_even_with_an_end_marker(samples_dir, encoding):
    data = sample_jpeg(samples_dir, encoding)
    expect_code(data[: len(data) // 2], "truncated")
    expect_code(cut_with_end_marker(data), "truncated")


@pytest.mark.parametrize("grey", [128, 127])
def test_jpeg_that_really_ends_in_mid_grey_is_scored(encode, spec, limits, grey):
    # given a complete JPEG whose bottom quarter is flat mid-grey, as a cut one's is
    image = Image.new("RGB", (640, 480), RED)
    image.paste((grey, grey, grey), (0, 360, 640, 480))
    data = encode(image, "JPEG", quality=95)

    # when it is preprocessed / then it is scored, its grey corner checked and kept
    out = preprocess(data, spec, limits)
    assert out.shape == (3, 224, 224)
    assert_colour(out[:, -1, -1], (grey, grey, grey), tolerance=1)


def test_no_real_photograph_is_taken_for_truncated(samples_dir, spec, limits):
    # given every sample and, where present, the 100 shared ImageNet photographs
    paths = sorted(samples_dir.iterdir()) + imagenet_photos()

    # when each is preprocessed / then none is refused
    for path in paths:
        assert preprocess(path.read_bytes(), spec, limits).shape == (3, 224, 224), path


def test_truncated_png_is_truncated(samples_dir, encode):
    with Image.open(samples_dir / "chelsea.jpg") as image:
        data = encode(image.convert("RGB"), "PNG")
    expect_code(data[: len(data) // 2], "truncated")


def test_png_claiming_ten_gigapixels_is_refused_from_its_header_without_allocating(
        monkeypatch):
    # given a tiny PNG whose header claims 100000x100000 pixels (30 GB of RGB),
    # and a decoder that fails the test if it is ever asked to decode pixels
    data = png_claiming(100_000, 100_000)
    assert len(data) < 200

    def decoded(image, *args, **kwargs):
        pytest.fail(f"{image.size[0]}x{image.size[1]} pixels were decoded")

    monkeypatch.setattr(ImageFile.ImageFile, "load", decoded)
    process = psutil.Process()
    rss_before = process.memory_info().rss
    tracemalloc.start()

    # when it is preprocessed
    error = expect_code(data, "image_too_large")
    _, peak = tracemalloc.get_traced_memory()
    tracemalloc.stop()
    rss_growth = process.memory_info().rss - rss_before

    # then it is refused from the header (fast: no pixel was decoded), and no
    # pixel buffer was allocated
    assert "100000x100000" in error.message
    assert peak < 16 * 1024 * 1024
    assert rss_growth < 256 * 1024 * 1024


def test_pixel_cap_comes_from_the_limits(encode, spec):
    # given a 300x200 image and a cap of 50,000 pixels
    data = encode(Image.new("RGB", (300, 200), RED))

    # when / then: 60,000 pixels is refused, the same image under a larger cap is not
    expect_code(data, "image_too_large", InputLimits(max_image_pixels=50_000))
    assert preprocess(data, spec, InputLimits(max_image_pixels=60_000)).shape == (3, 224, 224)


@pytest.mark.filterwarnings("ignore::UserWarning")  # Pillow's notes on damaged metadata
@pytest.mark.parametrize("fmt", ["JPEG", "PNG", "GIF", "BMP", "TIFF"])
def test_corrupted_files_give_an_input_error_or_pixels_never_a_crash(samples_dir, encode,
                                                                     spec, limits, fmt):
    # given a small image in one format, and 80 copies with bytes overwritten
    # (half of them in the header) and some also cut short
    with Image.open(samples_dir / "chelsea.jpg") as image:
        data = encode(image.convert("RGB").resize((64, 48)), fmt)

    for damaged in damaged_copies(data):
        # when it is preprocessed
        try:
            out = preprocess(damaged, spec, limits)
        except InputError:
            continue  # then: a per-file error with a code ...

        # ... or a well-formed output, never another exception
        assert out.shape == (3, 224, 224) and out.dtype == np.uint8


def test_input_error_survives_pickling():
    # errors cross process boundaries from the preprocessing workers
    import pickle

    error = pickle.loads(pickle.dumps(InputError("truncated", "cut short")))
    assert (error.code, error.message) == ("truncated", "cut short")


# --- PillowBackend.run ------------------------------------------------------


def test_backend_run_returns_one_outcome_per_input_in_order(samples_dir, encode, spec, limits):
    # given a mixed list of good and bad inputs
    good_jpeg = (samples_dir / "coffee.jpg").read_bytes()
    good_png = encode(Image.new("L", (40, 30), 77))
    inputs = [good_jpeg, b"", good_png, b"GIF89a nonsense", good_jpeg[:2000], good_jpeg]
    backend = PillowBackend(spec, limits)
    backend.setup()

    # when the backend runs them as one chunk
    try:
        outcomes = backend.run(inputs)
    finally:
        backend.close()

    # then each input has its outcome, in order, errors in place
    assert len(outcomes) == len(inputs)
    assert isinstance(outcomes[0], np.ndarray) and outcomes[0].shape == (3, 224, 224)
    assert isinstance(outcomes[1], InputError) and outcomes[1].code == "empty_file"
    assert isinstance(outcomes[2], np.ndarray) and int(outcomes[2][0, 0, 0]) == 77
    assert isinstance(outcomes[3], InputError)
    assert outcomes[3].code in {"not_an_image", "decode_failed", "truncated"}
    assert isinstance(outcomes[4], InputError) and outcomes[4].code == "truncated"
    np.testing.assert_array_equal(outcomes[5], outcomes[0])


def test_backend_run_on_an_empty_chunk_returns_nothing(spec, limits):
    assert PillowBackend(spec, limits).run([]) == []
