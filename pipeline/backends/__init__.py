"""Inference backends: setup(), predict(uint8 batch) -> logits, close()."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np
import torch

from pipeline.backends.torch import TorchBackend, resolve_device
from pipeline.models import LoadedModel

__all__ = ["InferenceBackend", "TorchBackend", "create_inference_backend", "resolve_device"]


class InferenceBackend(Protocol):
    """Runs one LoadedModel on one device; heavy work happens in setup()."""

    name: str
    model: LoadedModel
    max_batch_size: int
    warmup_s: float
    last_staging_s: float

    def setup(self) -> None: ...

    def predict(self, samples: Sequence[np.ndarray]) -> torch.Tensor: ...

    def close(self) -> None: ...


def create_inference_backend(name: str, model: LoadedModel, device: torch.device,
                             max_batch_size: int, sample_shape: tuple[int, int, int],
                             threads: int, cache_dir: Path) -> InferenceBackend:
    """The backend called `name`; exported artifacts are kept under cache_dir/artifacts."""
    if name == "onnxruntime":
        from pipeline.backends.artifacts import ArtifactStore
        from pipeline.backends.onnx import OnnxBackend

        return OnnxBackend(model, device, max_batch_size, sample_shape, threads,
                           store=ArtifactStore.in_cache(cache_dir))
    return TorchBackend(model, device, max_batch_size, sample_shape, threads)
