"""Small things several tests build: hostile image headers, a model that costs nothing."""

from __future__ import annotations

import struct
import zlib

import numpy as np
import torch


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
