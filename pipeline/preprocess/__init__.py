"""Preprocessing backends: encoded image bytes in, uint8 CHW arrays out.

Every backend implements the same `PreprocessSpec` and must agree with the
others (same top-1, mean absolute pixel difference of at most 2/255). No
backend imports torch: they run in lightweight worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import asdict, dataclass
from typing import Any, Protocol, Union

import numpy as np

from pipeline.errors import InputError

Outcome = Union[np.ndarray, InputError]
# The filters DALI has (the tests check each against Pillow's); Pillow also has box
# and hamming, so a recipe that names either runs on the pillow backend only.
DALI_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


@dataclass(frozen=True)
class DecoderHints:
    """How DALI's decoder runs. nvJPEG's settings, for the GPU decoder
    (`device="mixed"`) only: the share of JPEG data sent to the hardware
    decoder, and the padding nvJPEG adds to its device and host buffers so
    that they are reallocated less often as image sizes vary (defaults are
    DALI's). And whether a JPEG is decoded in the crop's window only
    (dali_roi.py): "auto" does so on the CPU, where it was measured faster,
    and not on the GPU, where it is not measured yet."""

    hw_decoder_load: float = 0.65
    device_memory_padding: int = 16 * 1024 * 1024
    host_memory_padding: int = 8 * 1024 * 1024
    roi_decode: str = "auto"  # "auto", "on" or "off"

    def for_decoder(self, decoder_device: str) -> dict[str, Any]:
        """The decoder's keyword arguments: none for the CPU decoder."""
        if decoder_device == "cpu":
            return {}
        return {key: value for key, value in asdict(self).items() if key != "roi_decode"}

    def decodes_windows(self, decoder_device: str) -> bool:
        return self.roi_decode == "on" or self.roi_decode == "auto" and decoder_device == "cpu"


DALI_DEFAULT_HINTS = DecoderHints()


class PreprocessBackend(Protocol):
    """Decode and transform a batch; one outcome per input, in order.

    With a test-time augmentation mode (`tta`, see `pipeline.spec.tta_views`)
    other than "none", an outcome stacks the image's views, cut from one
    decode: (views, 3, H, W). `fallbacks` counts the images handed to another
    decoder (DALI to Pillow).
    """

    name: str
    fallbacks: int

    def setup(self) -> None: ...

    def run(self, images: Sequence[bytes], tta: str = "none") -> list[Outcome]: ...

    def close(self) -> None: ...
