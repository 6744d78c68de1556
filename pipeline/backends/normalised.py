"""The model as every exported artifact holds it: uint8 NCHW in, logits out (or,
around a `WithFeatures` module, logits and pooled features).

Normalisation lives inside the graph (``x.float() * scale + shift``), so the
host only stacks the bytes preprocessing produced, whatever the backend.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch


class Normalised(torch.nn.Module):
    """uint8 NCHW in, logits out: ``model(x.float() * scale + shift)``."""

    def __init__(self, module: torch.nn.Module, mean: Sequence[float],
                 std: Sequence[float]) -> None:
        super().__init__()
        self.module = module
        scale = 1.0 / torch.tensor(std, dtype=torch.float32)
        # Frozen parameters rather than buffers: typed attributes that both ONNX
        # exporters (and TorchScript, which cannot read postponed annotations) accept.
        self.scale = torch.nn.Parameter(scale.reshape(1, 3, 1, 1), requires_grad=False)
        self.shift = torch.nn.Parameter((-torch.tensor(mean) * scale).reshape(1, 3, 1, 1),
                                        requires_grad=False)

    def forward(self, pixels: torch.Tensor) -> Any:
        return self.module(pixels.float() * self.scale + self.shift)


def module_device(module: torch.nn.Module) -> torch.device:
    """Where a module's parameters live (the CPU for one without any)."""
    parameter = next(module.parameters(), None)
    return parameter.device if parameter is not None else torch.device("cpu")
