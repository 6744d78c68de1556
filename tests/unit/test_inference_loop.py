"""InferenceLoop: a batch too big for the device is halved, not failed."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.backends import TorchBackend
from pipeline.errors import TransientError
from pipeline.inference import InferenceLoop
from pipeline.items import Job, Prepared
from pipeline.models import LoadedModel
from tests.builders import MeanColour

SHAPE = (3, 8, 8)


class FitsAtMost(torch.nn.Module):
    """MeanColour, but a batch over `limit` raises CUDA's out-of-memory error."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.inner = MeanColour()
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner(x)


def worker_with(limit: int) -> tuple[InferenceLoop, FitsAtMost]:
    module = FitsAtMost(limit)
    model = LoadedModel("fits", module, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                        [str(i) for i in range(1000)], "digest")
    backend = TorchBackend(model, torch.device("cpu"), 8, SHAPE)
    module.limit = 8  # warm-up runs whole batches
    backend.setup()
    module.limit, module.batch_sizes = limit, []
    return InferenceLoop(backend, topk=1), module


def items(count: int) -> list[Prepared]:
    return [Prepared(Job(f"{i}.png"), pixels=np.full(SHAPE, i, dtype=np.uint8))
            for i in range(count)]


def test_a_batch_that_runs_out_of_memory_is_scored_in_halves():
    worker, module = worker_with(limit=2)
    records = worker.score(items(8))
    assert [r["status"] for r in records] == ["ok"] * 8
    assert module.batch_sizes == [8, 4, 2, 2, 4, 2, 2]
    # the halves give the same answers as one batch does (up to float rounding)
    module.limit = 8
    for halved, whole in zip(records, worker.score(items(8)), strict=True):
        assert halved["predictions"][0]["index"] == whole["predictions"][0]["index"]
        assert halved["predictions"][0]["score"] == pytest.approx(
            whole["predictions"][0]["score"], abs=1e-5)


def test_a_single_image_that_does_not_fit_is_a_transient_error():
    worker, _ = worker_with(limit=0)
    with pytest.raises(TransientError, match="out of device memory"):
        worker.score(items(1))
