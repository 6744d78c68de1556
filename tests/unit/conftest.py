"""Shared fixtures for the unit tests: specs, in-memory image encoding, photos."""

from __future__ import annotations

import io
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from pipeline.spec import InputLimits, PreprocessSpec

Encode = Callable[..., bytes]

# `samples_dir` (the repository's samples/ folder) comes from tests/conftest.py.


@pytest.fixture(scope="session")
def spec() -> PreprocessSpec:
    return PreprocessSpec()


@pytest.fixture(scope="session")
def limits() -> InputLimits:
    return InputLimits()


@pytest.fixture(scope="session")
def encode() -> Encode:
    """encode(image, "PNG"|"JPEG"|..., **save_options) -> the file's bytes."""

    def _encode(image: Image.Image, fmt: str = "PNG", **options: object) -> bytes:
        buffer = io.BytesIO()
        image.save(buffer, fmt, **options)
        return buffer.getvalue()

    return _encode


@pytest.fixture(scope="session")
def large_photo(samples_dir: Path) -> Image.Image:
    """A 4000x3000 RGB photograph, upscaled from a sample (real image statistics)."""
    with Image.open(samples_dir / "coffee.jpg") as source:
        return source.convert("RGB").resize((4000, 3000), Image.Resampling.BICUBIC)


@pytest.fixture(scope="session")
def photos(samples_dir: Path) -> list[np.ndarray]:
    """Every sample photograph, preprocessed by the Pillow backend as in production."""
    from pipeline.backends.calibration import preprocessed

    paths = sorted(str(p) for p in samples_dir.iterdir())
    samples = list(preprocessed(paths, PreprocessSpec(), InputLimits()).values())
    assert len(samples) == len(paths)
    return samples
