"""Small things several tests build: hostile image headers, a model that costs nothing."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch
import torchvision

from pipeline.models import LoadedModel


def png_claiming(width: int, height: int) -> bytes:
    """A tiny PNG (valid CRCs) whose header claims width x height RGB pixels."""

    def chunk(kind: bytes, body: bytes) -> bytes:
        crc = zlib.crc32(kind + body) & 0xFFFFFFFF
        return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", crc)

    header = struct.pack(">IIBBBBB", width, height, 8, 2, 0, 0, 0)
    return (b"\x89PNG\r\n\x1a\n" + chunk(b"IHDR", header)
            + chunk(b"IDAT", zlib.compress(b"\0" * 64)) + chunk(b"IEND", b""))


class MeanColour(torch.nn.Module):
    """(N, 3, H, W) -> (N, classes) logits from the mean colour: nearly free to run."""

    def __init__(self, classes: int = 1000) -> None:
        super().__init__()
        self.head = torch.nn.Linear(3, classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.head(x.mean(dim=(2, 3)))


def small_cnn() -> LoadedModel:
    """A few conv layers with fixed random weights: quick for inductor to compile."""
    torch.manual_seed(0)
    layers = torch.nn.Sequential(
        torch.nn.Conv2d(3, 16, 3, stride=2), torch.nn.BatchNorm2d(16), torch.nn.ReLU6(),
        torch.nn.Conv2d(16, 32, 3, stride=2), torch.nn.ReLU(),
        torch.nn.AdaptiveAvgPool2d(1), torch.nn.Flatten(), torch.nn.Linear(32, 100)).eval()
    return LoadedModel("small_cnn", layers, (123.7, 116.3, 103.5), (58.4, 57.1, 57.4),
                       [str(i) for i in range(100)], "1" * 32)


def random_mobilenet(seed: int) -> dict[str, torch.Tensor]:
    """mobilenet_v3_small with random weights whose outputs depend on the input.

    Freshly initialised, its activations vanish (logits ~1e-10, a uniform
    softmax for every image); one pass in training mode over random inputs
    sets the batch-norm statistics so that signals survive.
    """
    torch.manual_seed(seed)
    model = torchvision.models.mobilenet_v3_small(weights=None)
    for layer in model.modules():
        if isinstance(layer, torch.nn.BatchNorm2d):
            layer.momentum = None  # running statistics = this batch's statistics
    model.train()
    with torch.no_grad():
        model(torch.randn(16, 3, 224, 224))
    return model.state_dict()


def near_tie_mobilenet(seed: int) -> dict[str, torch.Tensor]:
    """`random_mobilenet` whose logits are 100 plus a few hundredths: fp32 ranks the
    classes differently per image, while bf16 (spacing 0.5 at 100) ties them all."""
    weights = random_mobilenet(seed)
    weights["classifier.3.weight"] *= 0.05
    weights["classifier.3.bias"] = torch.full_like(weights["classifier.3.bias"], 100.0)
    return weights


def damaged_copies(data: bytes, count: int = 80, seed: int = 7) -> list[bytes]:
    """Copies of `data` with a few bytes overwritten (every other one within the
    first 200, where headers live); every third copy is also cut short."""
    rng = np.random.default_rng(seed)
    copies = []
    for attempt in range(count):
        damaged = bytearray(data)
        span = min(len(damaged), 200) if attempt % 2 else len(damaged)
        for _ in range(int(rng.integers(1, 10))):
            damaged[int(rng.integers(0, span))] = int(rng.integers(0, 256))
        if attempt % 3 == 0:
            damaged = damaged[: int(rng.integers(1, len(damaged)))]
        copies.append(bytes(damaged))
    return copies


class Declared(torch.nn.Module):
    """A TorchScript classifier that declares its features: the mean colour."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.cat([self.embed(x), torch.zeros(x.shape[0], 997)], dim=1)

    @torch.jit.export
    def embed(self, x: torch.Tensor) -> torch.Tensor:
        return x.mean(dim=(2, 3))
