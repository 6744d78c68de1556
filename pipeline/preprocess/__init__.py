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

BACKENDS = ("pillow", "dali")


class PreprocessBackend(Protocol):
    """Decode and transform a batch; one outcome per input, in order.

    `fallbacks` counts the images handed to another decoder (DALI to Pillow).
    """

    name: str
    fallbacks: int

    def setup(self) -> None: ...

    def run(self, images: Sequence[bytes]) -> list[Outcome]: ...

    def close(self) -> None: ...


def create_backend(name: str, spec: PreprocessSpec, limits: InputLimits,
                   device: str = "cpu", threads: int = 1) -> PreprocessBackend:
    """Build a backend by its resolved name ("pillow" or "dali")."""
    if name == "pillow":
        from pipeline.preprocess.pillow import PillowBackend

        return PillowBackend(spec, limits)
    if name == "dali":
        from pipeline.preprocess.dali import DaliBackend

        return DaliBackend(spec, limits, device=device, num_threads=threads)
    raise ValueError(f"unknown preprocessing backend {name!r}; choose one of {BACKENDS}")


from pipeline.spec import InputLimits, PreprocessSpec  # noqa: E402
