"""DALI backend: batched decode (nvJPEG on GPU) and one resample of the crop box.

Inputs whose header DALI would not decode exactly like the pillow backend, and
any single file DALI fails on, are handled by the pillow backend instead. So
is a JPEG whose last pixel (as stored) decodes to mid-grey luma, the mark of
a file whose data ends before its pixels do: the pillow backend tells such a
file from a real grey corner (pillow.refuse_incomplete_jpeg).

Where DecoderHints.decodes_windows says so, a JPEG is decoded in the window
its crop needs only (image_slice; the window from dali_roi.py), which still
holds that last pixel.

Test-time augmentation views are cut from one decode inside the graph: one
resize per distinct region (the crop box as a per-sample ROI) and
crop_mirror_normalize's `mirror` for the mirrored views, stacked in the
order of `pipeline.spec.tta_views`. Each TTA mode gets its own graph, built
when first used.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any, Optional, cast

import numpy as np
from nvidia.dali import fn, pipeline_def, types
from nvidia.dali.data_node import DataNode
from nvidia.dali.pipeline import Pipeline
from PIL import Image

from pipeline.errors import ConfigError, InputError
from pipeline.items import Pixels, on_host
from pipeline.preprocess import (
    DALI_DEFAULT_HINTS,
    DALI_INTERPOLATIONS,
    DecoderHints,
    Outcome,
)
from pipeline.preprocess.dali_roi import Roi, Window, window, within
from pipeline.preprocess.pillow import (
    ORIENTATION_TAG,
    PillowBackend,
    has_mid_grey_luma,
    open_image,
)
from pipeline.spec import InputLimits, PreprocessSpec, tta_views

UINT8, INT32, FLOAT = (types.DALIDataType.UINT8, types.DALIDataType.INT32,
                       types.DALIDataType.FLOAT)
RGB = types.DALIImageType.RGB
INTERP = {
    "nearest": types.DALIInterpType.INTERP_NN,
    "bilinear": types.DALIInterpType.INTERP_LINEAR,
    "bicubic": types.DALIInterpType.INTERP_CUBIC,
    "lanczos": types.DALIInterpType.INTERP_LANCZOS3,
}
DALI_FORMATS = {"JPEG", "PNG", "BMP", "WEBP", "TIFF"}
PLAIN_RAWMODES = {"RGB", "L", "BGR"}  # 8 bits per channel, no alpha, no inversion
SWAPS_AXES = {5, 6, 7, 8}  # EXIF orientations that transpose width and height
# The graph's corners, in the order _graph stacks them: top left, top right,
# bottom left, bottom right of the upright image.
CORNERS = ((0, 0), (0, -1), (-1, 0), (-1, -1))
# Per EXIF orientation, the corner of the upright image where the last pixel
# the decoder wrote (bottom right as stored) ends up.
LAST_PIXEL_CORNER = {1: 3, 2: 2, 3: 0, 4: 1, 5: 3, 6: 2, 7: 0, 8: 1}


@dataclass(frozen=True)
class _Job:
    """One input bound for DALI, with one (y, x) ROI of the decoded image per
    distinct region its views are cut from (`_regions`)."""

    index: int
    data: bytes
    rois: tuple[Roi, ...]  # in the decoded window's coordinates
    last_pixel_corner: int | None  # for JPEGs: an index into CORNERS
    window: Window | None = None  # what a windowed graph decodes (dali_roi.py)


DaliJob = _Job  # what plan_job makes and feed() takes


def _regions(tta: str) -> tuple[str, ...]:
    """The distinct regions the views of `tta` are cut from, in first-use order."""
    return tuple(dict.fromkeys(view.region for view in tta_views(tta)))


@pipeline_def(prefetch_queue_depth=1)
def _graph(spec: PreprocessSpec, decoder_device: str, tta: str = "none",
           decoder_options: Optional[Mapping[str, Any]] = None, windowed: bool = False
           ) -> tuple[DataNode, DataNode]:
    """Encoded bytes + per-sample ROIs (one per region) -> uint8 CHW crop (with a TTA
    mode, the views stacked: V x C x H x W), and the decoded image's four corner
    pixels (4 x RGB, in CORNERS order). `decoder_options`: the GPU decoder's
    (DecoderHints.for_decoder). `windowed`: each sample decodes its window only."""
    encoded = fn.external_source(name="encoded", dtype=UINT8, ndim=1)
    # Fancy upsampling makes nvJPEG's chroma match libjpeg-turbo (DALI CPU and pillow).
    options = dict(device=decoder_device, output_type=RGB, adjust_orientation=True,
                   jpeg_fancy_upsampling=True, **(decoder_options or {}))
    if windowed:  # (y, x) anchor and extent in the upright image: integers, absolute
        anchor = fn.external_source(name="window_anchor", dtype=INT32, ndim=1)
        extent = fn.external_source(name="window_shape", dtype=INT32, ndim=1)
        decoded = fn.decoders.image_slice(encoded, anchor, extent, axes=[0, 1], **options)
    else:
        decoded = fn.decoders.image(encoded, **options)
    size = spec.crop_size  # (height, width), as DALI orders an HWC image's extents
    cut = {}
    for number, region in enumerate(_regions(tta)):
        roi_start = fn.external_source(name=f"roi_start_{number}", dtype=FLOAT, ndim=1)
        roi_end = fn.external_source(name=f"roi_end_{number}", dtype=FLOAT, ndim=1)
        # Resample the crop box in one step, as pillow does: resize_shorter + centre crop
        # rounds the crop offset differently (mean abs diff up to 3.5 on samples/).
        cut[region] = cast(DataNode, fn.resize(
            decoded, size=size, roi_start=roi_start, roi_end=roi_end,
            interp_type=INTERP[spec.interpolation], antialias=True))
    views = [fn.crop_mirror_normalize(cut[view.region], crop=size, dtype=UINT8,
                                      output_layout="CHW", mirror=int(view.mirrored))
             for view in tta_views(tta)]
    corners = fn.stack(*(decoded[row, column] for row, column in CORNERS))
    return (views[0] if tta == "none" else fn.stack(*views)), corners


def build_graph(spec: PreprocessSpec, device: str, tta: str, batch_size: int,
                num_threads: int, prefetch_queue_depth: int = 1,
                hints: DecoderHints = DALI_DEFAULT_HINTS) -> Pipeline:
    """The built DALI pipeline of `tta` on `device` ("cpu", "cuda[:N]"): fed by
    feed(), its outputs read by outcomes()."""
    decoder_device, device_id = parse_device(device)
    pipe = _graph(spec, decoder_device, tta, hints.for_decoder(decoder_device),
                  hints.decodes_windows(decoder_device), batch_size=batch_size,
                  num_threads=num_threads, device_id=device_id,
                  prefetch_queue_depth=prefetch_queue_depth)
    pipe.build()
    return cast(Pipeline, pipe)


def feed(pipe: Pipeline, jobs: Sequence[_Job], tta: str) -> None:
    """Hand one batch of jobs to the pipeline's external sources."""
    pipe.feed_input("encoded", [np.frombuffer(job.data, np.uint8) for job in jobs])
    if jobs[0].window is not None:  # planned for a windowed graph (plan_job)
        pipe.feed_input("window_anchor", [_ints(job.window, 0) for job in jobs])
        pipe.feed_input("window_shape", [_ints(job.window, 1) for job in jobs])
    for number in range(len(_regions(tta))):
        pipe.feed_input(f"roi_start_{number}",
                        [np.array(job.rois[number][0], np.float32) for job in jobs])
        pipe.feed_input(f"roi_end_{number}",
                        [np.array(job.rois[number][1], np.float32) for job in jobs])


def outcomes(jobs: Sequence[_Job], batch: object, corners: object, on_gpu: bool,
             to_torch: Optional[Callable[[object], Any]] = None
             ) -> list[Optional[Pixels]]:
    """The pixels of each job from a batch's outputs, or None for a JPEG that
    pillow must look at again (see the module doc): rows of the one tensor
    `to_torch` copies the batch into (dali_torch.TorchOutput.copy), else NumPy
    arrays on the host."""
    if on_gpu:
        corners = corners.as_cpu()  # type: ignore[attr-defined]
    if to_torch is not None:
        rows = to_torch(batch)
    else:
        on_host = batch.as_cpu() if on_gpu else batch  # type: ignore[attr-defined]
        rows = [np.array(on_host[i]) for i in range(len(jobs))]  # type: ignore[index]
    return [None if _may_be_incomplete(job, np.array(corners[i]))  # type: ignore[index]
            else rows[i] for i, job in enumerate(jobs)]


def plan_job(index: int, data: bytes, spec: PreprocessSpec, limits: InputLimits,
             tta: str = "none", windowed: bool = False) -> _Job | None:
    """The DALI job for one input, from its header; None means use pillow. An
    InputError for bytes that are no image, or one over the limits. `windowed`:
    for a graph that decodes windows (DecoderHints.decodes_windows)."""
    return _job(index, open_image(data, limits), data, spec, tta, windowed)


def _ints(window: Window | None, part: int) -> np.ndarray:
    assert window is not None
    return np.array(window[part], np.int32)


def parse_device(device: str) -> tuple[str, int | None]:
    """Map "cpu" to the CPU decoder and "cuda" / "cuda:N" to nvJPEG on GPU N."""
    if device == "cpu":
        return "cpu", None
    if device == "cuda" or device.startswith("cuda:") and device[5:].isdigit():
        return "mixed", int(device[5:] or 0)
    raise ConfigError(f"dali device must be 'cpu', 'cuda' or 'cuda:N', got {device!r}")


def _rawmodes(image: Image.Image) -> set[str]:
    """How pillow would unpack the pixel data, e.g. "RGB", "RGB;16B", "L;I", "BGRX"."""
    args = [tile[3] for tile in getattr(image, "tile", [])]
    return {arg if isinstance(arg, str) else arg[0] for arg in args}


def _orientation(image: Image.Image, data: bytes) -> int | None:
    """The EXIF orientation DALI applies, or None where we have not verified it matches."""
    if image.format == "JPEG":
        try:
            value = image.getexif().get(ORIENTATION_TAG, 1)
        except Exception:  # malformed EXIF: let pillow decide what it means
            return None
        return value if value in range(1, 9) else None
    # PNG may carry eXIf after IDAT, which pillow only sees after a full decode.
    has_exif = "exif" in image.info or (image.format == "PNG" and b"eXIf" in data)
    tiff_rotated = getattr(image, "tag_v2", {}).get(ORIENTATION_TAG, 1) != 1
    return None if has_exif or tiff_rotated else 1


def _job(index: int, image: Image.Image, data: bytes, spec: PreprocessSpec,
         tta: str = "none", windowed: bool = False) -> _Job | None:
    """The DALI job for one input; None means use pillow."""
    orientation = _orientation(image, data)
    if orientation is None:
        return None
    rois = _region_rois(image, orientation, spec, tta)
    if rois is None:
        return None
    corner = LAST_PIXEL_CORNER[orientation] if image.format == "JPEG" else None
    if not windowed:
        return _Job(index, data, rois, corner)
    width, height = image.size
    if orientation in SWAPS_AXES:
        width, height = height, width
    decoded = window(width, height, rois, spec, corner)
    return _Job(index, data, within(rois, decoded), corner, decoded)


def _region_rois(image: Image.Image, orientation: int, spec: PreprocessSpec,
                 tta: str = "none") -> tuple[Roi, ...] | None:
    """Each region's box as a (y, x) ROI, for plain 8-bit RGB/L stills; None means
    use pillow."""
    if (image.format not in DALI_FORMATS or image.mode not in ("RGB", "L")
            or "transparency" in image.info or getattr(image, "n_frames", 1) != 1
            or not _rawmodes(image) <= PLAIN_RAWMODES):
        return None
    width, height = image.size
    if orientation in SWAPS_AXES:
        width, height = height, width
    rois = []
    for region in _regions(tta):
        left, top, right, bottom = spec.region_box(width, height, region)
        rois.append(((top, left), (bottom, right)))
    return tuple(rois)


def _may_be_incomplete(job: _Job, corners: np.ndarray) -> bool:
    """Whether a JPEG's last decoded pixel has mid-grey luma (see the module doc)."""
    if job.last_pixel_corner is None:
        return False
    red, green, blue = corners[job.last_pixel_corner].tolist()
    return has_mid_grey_luma(red, green, blue)


def check_reproducible(spec: PreprocessSpec) -> None:
    """ConfigError for a spec whose filter DALI lacks."""
    if spec.interpolation not in DALI_INTERPOLATIONS:
        raise ConfigError(f"preprocess.interpolation = {spec.interpolation!r} cannot be "
                          f"reproduced by the dali backend; use the pillow backend")


class DaliBackend:
    """Decodes batches with DALI on the CPU or, for device "cuda[:N]", with nvJPEG."""

    name = "dali"

    def __init__(self, spec: PreprocessSpec, limits: InputLimits, device: str = "cpu",
                 num_threads: int = 1, batch_size: int = 16,
                 hints: DecoderHints = DALI_DEFAULT_HINTS) -> None:
        self.spec = spec
        self.limits = limits
        self.batch_size = batch_size
        self.num_threads = num_threads
        self.hints = hints
        check_reproducible(spec)
        self.device = device
        self._decoder_device, self._device_id = parse_device(device)
        self._pipes: dict[str, Pipeline] = {}  # one graph per TTA mode, built when used
        self._fallback = PillowBackend(spec, limits)
        self.fallbacks = 0  # files handled by the pillow backend instead of DALI

    def setup(self, tta: str = "none") -> None:
        """Build the DALI pipeline for `tta` (and the CUDA context when on a GPU)."""
        self._pipes[tta] = build_graph(self.spec, self.device, tta, self.batch_size,
                                       self.num_threads, hints=self.hints)

    def run(self, images: Sequence[bytes], tta: str = "none") -> list[Outcome]:
        """One uint8 CHW array (its views stacked, with a TTA mode) or InputError
        per input, in order."""
        if tta not in self._pipes:
            self.setup(tta)
        outcomes: dict[int, Outcome] = {}
        jobs: list[_Job] = []
        for index, data in enumerate(images):
            try:
                job = plan_job(index, data, self.spec, self.limits, tta,
                               self.hints.decodes_windows(self._decoder_device))
            except InputError as exc:
                outcomes[index] = exc
                continue
            if job is None:
                outcomes[index] = self._pillow(data, tta)
            else:
                jobs.append(job)
        for start in range(0, len(jobs), self.batch_size):
            chunk = jobs[start:start + self.batch_size]
            for job, outcome in zip(chunk, self._run_batch(chunk, tta), strict=True):
                outcomes[job.index] = outcome
        return [outcomes[index] for index in range(len(images))]

    def close(self) -> None:
        """Release the pipelines and their buffers."""
        self._pipes.clear()

    def _run_batch(self, jobs: list[_Job], tta: str) -> list[Outcome]:
        try:
            return self._dali(jobs, tta)
        except RuntimeError:
            # After an error DALI may report the pipeline "no longer valid": rebuild
            # (about 5 ms), then isolate the bad samples so they cannot fail their neighbours.
            self.setup(tta)
            if len(jobs) == 1:
                return [self._pillow(jobs[0].data, tta)]
            return [self._run_batch([job], tta)[0] for job in jobs]

    def _dali(self, jobs: list[_Job], tta: str) -> list[Outcome]:
        pipe = self._pipes[tta]
        feed(pipe, jobs, tta)
        batch, corners = pipe.run()
        return [self._pillow(job.data, tta) if pixels is None else on_host(pixels)
                for job, pixels in zip(jobs, outcomes(jobs, batch, corners,
                                                      self._device_id is not None),
                                       strict=True)]

    def _pillow(self, data: bytes, tta: str = "none") -> Outcome:
        # The pillow backend reproduces the spec for everything, and names the error.
        self.fallbacks += 1
        return self._fallback.run_one(data, tta)
