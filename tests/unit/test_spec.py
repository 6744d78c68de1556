"""PreprocessSpec: digest, crop geometry (vs torchvision) and validation."""

from __future__ import annotations

import os
import subprocess
import sys
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
from PIL import Image
from torchvision import transforms

from pipeline.preprocess.pillow import preprocess
from pipeline.spec import InputLimits, PreprocessSpec

# --- digest -----------------------------------------------------------------


def test_equal_specs_have_equal_digests():
    # given two specs built separately with the same fields
    first = PreprocessSpec(256, 224, "bilinear")
    second = PreprocessSpec(resize_shorter=256, crop=224, interpolation="bilinear")

    # when / then
    assert first.digest() == second.digest()
    assert len(first.digest()) == 32
    int(first.digest(), 16)  # hex


def test_digest_is_the_same_in_another_process():
    # given the digest computed here
    here = PreprocessSpec().digest()

    # when another interpreter (with a different hash seed) computes it
    code = "from pipeline.spec import PreprocessSpec; print(PreprocessSpec().digest())"
    env = {**os.environ, "PYTHONHASHSEED": "12345"}
    there = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                           check=True, env=env, cwd=Path(__file__).resolve().parents[2])

    # then it is the same value
    assert there.stdout.strip() == here


@pytest.mark.parametrize("change", [
    {"resize_shorter": 257},
    {"crop": 223},
    {"interpolation": "bicubic"},
    {"interpolation": "nearest"},
])
def test_digest_changes_when_any_field_changes(change):
    # given the default spec and one with a single field changed
    base = PreprocessSpec()
    changed = replace(base, **change)

    # when / then
    assert changed.digest() != base.digest()


# --- crop geometry ----------------------------------------------------------


def _torchvision_box(width: int, height: int, resize: int, crop: int):
    """The source box kept by torchvision's Resize(resize) + CenterCrop(crop)."""
    resized_w, resized_h = transforms.Resize(resize)(Image.new("L", (width, height))).size
    left = int(round((resized_w - crop) / 2.0))
    top = int(round((resized_h - crop) / 2.0))
    sx, sy = resized_w / width, resized_h / height
    return (left / sx, top / sy, (left + crop) / sx, (top + crop) / sy)


@pytest.mark.parametrize("size", [
    (451, 300), (600, 400), (300, 451), (256, 256), (224, 300), (1000, 1000),
    (4000, 3000), (3000, 4000), (2000, 3), (3, 2000), (1, 1),
    # sizes where `long * (256 / short)` and torchvision's `256 * long / short`
    # round to different integers
    (49, 98), (98, 147), (98, 343), (147, 49),
], ids=lambda size: f"{size[0]}x{size[1]}")
def test_crop_box_is_the_box_torchvision_keeps(spec, size):
    # given an image size
    width, height = size

    # when the spec computes its crop box
    box = spec.crop_box(width, height)

    # then it is the source region torchvision's Resize + CenterCrop keeps
    assert box == pytest.approx(_torchvision_box(width, height, 256, 224), abs=1e-6)


@pytest.mark.parametrize("name", ["chelsea.jpg", "coffee.jpg"])
def test_pillow_backend_matches_torchvision_resize_and_center_crop(samples_dir, spec, name):
    # given a sample photograph and torchvision's reference transform
    data = (samples_dir / name).read_bytes()
    reference = transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.PILToTensor()])
    with Image.open(samples_dir / name) as image:
        expected = reference(image.convert("RGB")).numpy()

    # when the pillow backend preprocesses the same bytes
    actual = preprocess(data, spec, InputLimits())

    # then both agree to within 2/255 mean absolute difference
    assert actual.shape == expected.shape == (3, 224, 224)
    assert np.abs(actual.astype(np.int16) - expected.astype(np.int16)).mean() <= 2.0


def test_output_shape_follows_the_crop():
    assert PreprocessSpec(320, 288).output_shape == (3, 288, 288)


# --- validation -------------------------------------------------------------


@pytest.mark.parametrize("fields", [
    {"crop": 0},
    {"crop": -5},
    {"resize_shorter": 200, "crop": 224},
    {"resize_shorter": 0, "crop": 0},
])
def test_invalid_sizes_are_refused(fields):
    with pytest.raises(ValueError, match="crop"):
        PreprocessSpec(**fields)


def test_unknown_interpolation_is_refused():
    # an interpolation no backend implements must fail at construction, not
    # later inside a worker with a KeyError
    with pytest.raises(ValueError, match="interpolation"):
        PreprocessSpec(interpolation="cubic")  # type: ignore[arg-type]


def test_crop_equal_to_resize_is_allowed():
    assert PreprocessSpec(224, 224).crop_box(448, 224) == pytest.approx((112, 0, 336, 224))
