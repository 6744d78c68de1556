"""Small things several tests build: hostile image headers, a model that costs nothing."""

from __future__ import annotations

import struct
import zlib

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
