"""A hand-checkable classifier and photograph for test-time augmentation tests.

`Halves` scores three classes from how bright the left and right halves of
its input are: logits (ln 2 * L, ln 4 * R, 0), with L and R the halves' mean
brightness on a 0..1 scale. It takes the input normalised with ImageNet's
mean/std (as imgpipe feeds a TorchScript file) and undoes that first.

`halves_photo` is 256 x 256, its left half white and its right half black:
the default recipe (resize 256, crop 224) keeps it pixel for pixel, so the
centre crop is exactly half white (L = 1, R = 0) and its mirror image the
other way round (L = 0, R = 1):

- the crop alone:   softmax(ln 2, 0, 0)    = (1/2, 1/4, 1/4)
- its mirror image: softmax(0, ln 4, 0)    = (1/6, 2/3, 1/6)
- hflip, the mean:                          (1/3, 11/24, 5/24)

so TTA turns the winner from class 0 into class 1.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

LABELS = ["left", "right", "neither"]
NONE_PROBS = (1 / 2, 1 / 4, 1 / 4)
MIRRORED_PROBS = (1 / 6, 2 / 3, 1 / 6)
HFLIP_PROBS = (1 / 3, 11 / 24, 5 / 24)
SIZE = 256


def halves_photo(path: Path) -> Path:
    pixels = np.zeros((SIZE, SIZE, 3), np.uint8)
    pixels[:, : SIZE // 2] = 255
    Image.fromarray(pixels).save(path)
    return path


def halves_labels(path: Path) -> Path:
    path.write_text("\n".join(LABELS) + "\n")
    return path


def halves_module() -> Any:
    """The Halves classifier, a torch.nn.Module."""
    import torch

    from pipeline.recipes import IMAGENET_MEAN, IMAGENET_STD

    class Halves(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.mean = torch.nn.Parameter(torch.tensor(IMAGENET_MEAN).reshape(1, 3, 1, 1),
                                           requires_grad=False)
            self.std = torch.nn.Parameter(torch.tensor(IMAGENET_STD).reshape(1, 3, 1, 1),
                                          requires_grad=False)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            pixels = (x * self.std + self.mean) / 255.0
            half = pixels.shape[3] // 2
            left = pixels[:, :, :, :half].mean(dim=(1, 2, 3))
            right = pixels[:, :, :, half:].mean(dim=(1, 2, 3))
            return torch.stack([math.log(2.0) * left, math.log(4.0) * right,
                                torch.zeros_like(left)], dim=1)

    return Halves().eval()


def halves_model(path: Path) -> Path:
    """The Halves classifier as a TorchScript file."""
    import torch

    torch.jit.script(halves_module()).save(str(path))
    return path


def ranked(probs: tuple[float, ...]) -> list[tuple[str, float]]:
    """(label, probability) best first, as records rank them."""
    order = sorted(range(len(probs)), key=lambda i: (-probs[i], i))
    return [(LABELS[i], round(probs[i], 6)) for i in order]
