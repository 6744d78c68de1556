"""Preprocessing backends: encoded image bytes in, uint8 CHW arrays out.

Every backend implements the same `PreprocessSpec` and must agree with the
others (same top-1, mean absolute pixel difference of at most 2/255). No
backend imports torch: they run in lightweight worker processes.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Protocol, Union

import numpy as np

from pipeline.errors import InputError

Outcome = Union[np.ndarray, InputError]
# The filters DALI has (the tests check each against Pillow's); Pillow also has box
# and hamming, so a recipe that names either runs on the pillow backend only.
DALI_INTERPOLATIONS = ("nearest", "bilinear", "bicubic", "lanczos")


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
