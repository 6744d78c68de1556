"""Pillow(-SIMD) backend: JPEG draft decoding, one fused resize of the crop."""

from __future__ import annotations

import io
import re
import warnings
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Optional

import numpy as np
from PIL import Image, ImageFile, UnidentifiedImageError

from pipeline.errors import InputError
from pipeline.preprocess import Outcome
from pipeline.spec import InputLimits, PreprocessSpec

RESAMPLE = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": Image.Resampling.BILINEAR,
    "bicubic": Image.Resampling.BICUBIC,
    "lanczos": Image.Resampling.LANCZOS,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
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
# A file that ends early must fail ("truncated"), not decode with the rest
# left blank; whatever another library in this process sets.
ImageFile.LOAD_TRUNCATED_IMAGES = False

# libjpeg does not fail when a scan's data ends before the image does (its
# header claims more pixels than the data holds, or a cut file got an end
# marker): it warns, and decodes every block after that point as zero
# coefficients, whose luma is exactly mid-grey, down to the bottom-right corner.
MID_GREY = 128
# Luma recomputed from 8-bit RGB is off by rounding; chroma cancels out in it.
MID_GREY_TOLERANCE = 2
SOS, DRI, EOI, RST0 = 0xDA, 0xDD, 0xD9, 0xD0
# A marker: 0xFF then anything but a stuffed zero, a restart marker or more fill.
JPEG_MARKER = re.compile(rb"\xff[^\x00\xd0-\xd7\xff]")
# Entropy-coded bytes that a decoder reading them turns into anything but
# mid-grey (no 0xFF, so never a marker).
FILLER = bytes(range(1, 255))


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
        return self._scaled(spec.crop_box(*self.full_size))

    def view_boxes(self, spec: PreprocessSpec,
                   mode: str) -> list[tuple[tuple[float, float, float, float], bool]]:
        """(box in the decoded pixels, mirrored) for every view of TTA `mode`, in order."""
        return [(self._scaled(box), mirrored)
                for box, mirrored in spec.view_boxes(*self.full_size, mode)]

    def _scaled(self, box: tuple[float, float, float, float]
                ) -> tuple[float, float, float, float]:
        left, top, right, bottom = box
        scale = self.draft_scale
        return (left / scale, top / scale, right / scale, bottom / scale)


def load_pixels(image: Image.Image, spec: PreprocessSpec) -> Decoded:
    """Decode, at a reduced DCT scale when a JPEG is at least 2x what it needs.

    The draft target is twice the resize size so that a real antialiasing
    filter, not the DCT scaling, does the last 2x of the reduction; this keeps
    the output within 1/255 of a full-resolution decode.
    """
    width, height = image.size
    scale = draft(image, spec)
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


def draft(image: Image.Image, spec: PreprocessSpec) -> float:
    """Set a JPEG to decode at the most reduced DCT scale that still leaves
    twice the resize size; that scale's denominator (1.0 for a full decode)."""
    if image.format != "JPEG":
        return 1.0
    width = image.size[0]
    target = 2 * spec.resize_shorter
    drafted = image.draft(image.mode, (target, target))
    return 1.0 if drafted is None else width / drafted[1][2]


def refuse_incomplete_jpeg(image: Image.Image, data: bytes, spec: PreprocessSpec) -> None:
    """InputError "truncated" for a decoded JPEG whose data ended before its pixels did.

    Such an image ends in mid-grey luma (see MID_GREY). A real one may too, so
    one that does is decoded again with filler data where each scan ends:
    libjpeg skips bytes between a complete scan and the next marker, so the
    pixels only change when a scan was short and the decoder read the filler.
    """
    if image.format != "JPEG" or not _ends_in_mid_grey(image):
        return
    probe = _with_filler_after_scans(data)
    if probe is None or _decoded_bytes(probe, spec) in (None, image.tobytes()):
        return
    raise InputError("truncated", "image data is truncated: the JPEG's data ends before "
                     "the pixels its header claims")


def _ends_in_mid_grey(image: Image.Image) -> bool:
    """Whether the last pixel decoded (bottom right, as stored) has mid-grey luma."""
    if image.mode not in ("L", "RGB"):
        return False
    width, height = image.size
    corner = np.asarray(image.crop((width - 1, height - 1, width, height))).reshape(-1).tolist()
    red, green, blue = corner * 3 if image.mode == "L" else corner
    return has_mid_grey_luma(red, green, blue)


def has_mid_grey_luma(red: int, green: int, blue: int) -> bool:
    """Whether an RGB pixel's luma (BT.601, as JPEG's YCbCr) is mid-grey."""
    return abs(0.299 * red + 0.587 * green + 0.114 * blue - MID_GREY) <= MID_GREY_TOLERANCE


def _with_filler_after_scans(data: bytes) -> Optional[bytes]:
    """`data` with filler inserted where each scan's entropy-coded data ends;
    None unless the marker walk reaches the end of the image."""
    insertions = _scan_ends(data)
    if not insertions:
        return None
    pieces, start = [], 0
    for end, filler in insertions:
        pieces += [data[start:end], filler]
        start = end
    pieces.append(data[start:])
    return b"".join(pieces)


def _scan_ends(data: bytes) -> list[tuple[int, bytes]]:
    """Where each scan's entropy-coded data ends, and the filler to put there;
    empty unless the walk over the markers reaches EOI."""
    ends: list[tuple[int, bytes]] = []
    position, restart_interval = 2, 0  # after SOI
    while position + 2 <= len(data) and data[position] == 0xFF:
        marker = data[position + 1]
        if marker == EOI:
            return ends
        if marker == 0xFF:  # fill byte before a marker
            position += 1
            continue
        if position + 6 > len(data):
            break
        if marker == DRI:
            restart_interval = int.from_bytes(data[position + 4:position + 6], "big")
        position += 2 + int.from_bytes(data[position + 2:position + 4], "big")
        if marker == SOS:
            found = JPEG_MARKER.search(data, position)
            if found is None:
                break
            ends.append((found.start(), _filler(data, position, found.start(),
                                                restart_interval)))
            position = found.start()
    return []


def _filler(data: bytes, start: int, end: int, restart_interval: int) -> bytes:
    """What to insert where the scan in data[start:end] ends: FILLER, and with
    restart intervals first the restart marker a short scan expects next
    (libjpeg skips any other bytes while it waits for that marker, and
    ignores a stray restart marker after a complete scan)."""
    if not restart_interval:
        return FILLER
    last = max(range(8), key=lambda n: data.rfind(bytes((0xFF, RST0 + n)), start, end))
    seen = data.rfind(bytes((0xFF, RST0 + last)), start, end) >= 0
    return bytes((0xFF, RST0 + ((last + 1) % 8 if seen else 0))) + FILLER


def _decoded_bytes(data: bytes, spec: PreprocessSpec) -> Optional[bytes]:
    """The pixels of `data` decoded as `load_pixels` does, before rotation."""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            with Image.open(io.BytesIO(data)) as image:
                draft(image, spec)
                image.load()
                return image.tobytes()
    except Exception:  # the probe is only evidence; a failure proves nothing
        return None


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
    """Resample the kept box straight to the crop's size (resize + crop in one step)."""
    height, width = spec.crop_size
    cropped = image.resize((width, height), RESAMPLE[spec.interpolation], box=box)
    pixels = np.asarray(cropped)
    if pixels.ndim == 2:
        return np.ascontiguousarray(np.broadcast_to(pixels, (3, *pixels.shape)))
    return np.ascontiguousarray(pixels.transpose(2, 0, 1))


def mirrored(pixels: np.ndarray) -> np.ndarray:
    """A CHW view's mirror image (left and right swapped). Exact: resampling a
    box and mirroring it is resampling the mirrored box of the mirrored image."""
    return np.ascontiguousarray(pixels[:, :, ::-1])


def preprocess(data: bytes, spec: PreprocessSpec, limits: InputLimits,
               tta: str = "none") -> np.ndarray:
    """Encoded image bytes -> uint8 array of shape `spec.output_shape`; with a TTA
    mode other than "none", its views stacked: (views, *spec.output_shape).
    The image is decoded once, whatever the number of views."""
    image = open_image(data, limits)
    decoded = load_pixels(image, spec)
    refuse_incomplete_jpeg(image, data, spec)
    pixels = to_rgb_or_l(decoded.image)
    if tta == "none":
        return transform(pixels, decoded.crop_box(spec), spec)
    cut: dict[tuple[float, float, float, float], np.ndarray] = {}
    views = []
    for box, mirror in decoded.view_boxes(spec, tta):
        if box not in cut:  # a mirrored view resamples nothing again
            cut[box] = transform(pixels, box, spec)
        views.append(mirrored(cut[box]) if mirror else cut[box])
    return np.stack(views)


class PillowBackend:
    """Decodes one image at a time; parallelism comes from the worker pool."""

    name = "pillow"
    fallbacks = 0  # Pillow is the last resort: it hands nothing on

    def __init__(self, spec: PreprocessSpec, limits: InputLimits) -> None:
        self.spec = spec
        self.limits = limits

    def setup(self) -> None:
        pass

    def run(self, images: Sequence[bytes], tta: str = "none") -> list[Outcome]:
        return [self.run_one(data, tta) for data in images]

    def run_one(self, data: bytes, tta: str = "none") -> Outcome:
        """The array for one image (its views stacked, with a TTA mode), or the
        InputError that names its problem."""
        try:
            return preprocess(data, self.spec, self.limits, tta)
        except InputError as exc:
            return exc
        except Exception as exc:  # Pillow's plugins raise many types on hostile files
            return InputError("decode_failed", f"cannot decode image: {type(exc).__name__}: {exc}")

    def close(self) -> None:
        pass
