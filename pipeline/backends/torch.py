"""PyTorch eager backend: normalisation on the device, batched, inference_mode."""

from __future__ import annotations

import os
import time
from collections.abc import Sequence

import numpy as np
import torch

from pipeline.backends.staging import StagingRing
from pipeline.errors import ModelLoadError
from pipeline.models import LoadedModel

RING_BATCHES_AHEAD = 1


def resolve_device(requested: str) -> torch.device:
    """"auto" means the first CUDA device when there is one, else the CPU."""
    if requested == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    device = torch.device(requested)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ModelLoadError(f"device {requested!r} requested but CUDA is not available")
    return device


class TorchBackend:
    """Runs a LoadedModel on one device. Heavy work happens in setup()."""

    name = "torch"

    def __init__(self, model: LoadedModel, device: torch.device, max_batch_size: int,
                 sample_shape: tuple[int, int, int], threads: int = 0) -> None:
        self.model = model
        self.device = device
        self.max_batch_size = max_batch_size
        self.sample_shape = sample_shape
        self.threads = threads
        self.warmup_s = 0.0
        self.last_staging_s = 0.0  # the last batch's copy into the staging ring (and to the device)

    def setup(self) -> None:
        """Move to the device, build the staging ring, warm up."""
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads or os.cpu_count() or 1)
        if self.device.type == "cuda":
            torch.backends.cudnn.benchmark = True
        self.module = self.model.module.to(self.device).to(memory_format=torch.channels_last)
        shape = (1, 3, 1, 1)
        self.scale = (1.0 / torch.tensor(self.model.std)).reshape(shape).to(self.device)
        self.shift = (-torch.tensor(self.model.mean) * self.scale.cpu().flatten()
                      ).reshape(shape).to(self.device)
        self.ring = StagingRing(RING_BATCHES_AHEAD + 2, self.max_batch_size,
                                self.sample_shape, self.device)
        started = time.perf_counter()
        blank = np.zeros(self.sample_shape, dtype=np.uint8)
        for size in (1, self.max_batch_size):
            self.predict([blank] * size)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.warmup_s = time.perf_counter() - started

    @torch.inference_mode()
    def predict(self, samples: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 CHW samples -> float logits on the device, one row per sample."""
        started = time.perf_counter()
        batch = self.ring.stage(samples)
        self.last_staging_s = time.perf_counter() - started
        x = batch.float().mul_(self.scale).add_(self.shift)
        x = x.contiguous(memory_format=torch.channels_last)
        logits = self.module(x)
        if logits.shape[0] != len(samples):
            raise RuntimeError(f"model returned {logits.shape[0]} rows for {len(samples)} inputs")
        return logits

    def close(self) -> None:
        self.__dict__.pop("module", None)
        self.__dict__.pop("ring", None)
