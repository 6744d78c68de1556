"""Choosing and building a preprocessing backend for the hardware and what is installed."""

from __future__ import annotations

import importlib.metadata
import importlib.util

from pipeline.errors import ConfigError
from pipeline.preprocess import (
    DALI_DEFAULT_HINTS,
    DALI_INTERPOLATIONS,
    DecoderHints,
    PreprocessBackend,
)
from pipeline.spec import InputLimits, PreprocessSpec

BACKENDS = ("pillow", "dali")


def dali_available() -> bool:
    return importlib.util.find_spec("nvidia.dali") is not None


def pillow_implementation() -> str:
    """"pillow-simd" or "pillow": whichever distribution provides PIL now.

    Only Pillow-SIMD's own file list is read: mapping every installed
    distribution to its packages (packages_distributions) takes over a second
    beside torch's and CUDA's.
    """
    try:
        files = importlib.metadata.distribution("pillow-simd").files or []
    except importlib.metadata.PackageNotFoundError:
        return "pillow"
    return "pillow-simd" if any(f.as_posix() == "PIL/__init__.py" for f in files) else "pillow"


def resolve_backend(requested: str, device_type: str,
                    spec: PreprocessSpec | None = None) -> str:
    """"auto" is DALI (nvJPEG) on a GPU and Pillow-SIMD on the CPU, and Pillow
    wherever DALI cannot reproduce `spec` (an interpolation it lacks).

    On the CPU Pillow wins: its JPEG draft mode decodes large photos at a
    reduced DCT scale, which DALI's CPU decoder cannot (benchmarks/README.md).
    """
    if requested == "auto":
        reproducible = spec is None or dali_reproduces(spec)
        return ("dali" if device_type == "cuda" and reproducible and dali_available()
                else "pillow")
    if requested == "dali" and not dali_available():
        raise ConfigError("preprocess.backend = 'dali' but nvidia-dali-cuda120 is not "
                          "installed; install it or choose 'pillow' or 'auto'")
    return requested


def dali_reproduces(spec: PreprocessSpec) -> bool:
    """Whether the dali backend makes `spec`'s tensors (Pillow makes every spec's)."""
    return spec.interpolation in DALI_INTERPOLATIONS


def dali_in_process(setting: str, backend: str) -> bool:
    """Whether DALI decodes in the inference process (preprocess.dali_in_process)
    rather than in the pool's workers: only for the dali backend, and unless told
    "off": "auto" is "on" on every device. On a GPU that is its point; on the
    CPU the whole command was measured faster too, by its start-up
    (benchmarks/README.md)."""
    return backend == "dali" and setting != "off"


def create_backend(name: str, spec: PreprocessSpec, limits: InputLimits,
                   device: str = "cpu", threads: int = 1,
                   hints: DecoderHints = DALI_DEFAULT_HINTS) -> PreprocessBackend:
    """Build a backend by its resolved name ("pillow" or "dali")."""
    if name == "pillow":
        from pipeline.preprocess.pillow import PillowBackend

        return PillowBackend(spec, limits)
    if name == "dali":
        from pipeline.preprocess.dali import DaliBackend

        return DaliBackend(spec, limits, device=device, num_threads=threads, hints=hints)
    raise ValueError(f"unknown preprocessing backend {name!r}; choose one of {BACKENDS}")
