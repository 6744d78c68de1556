"""The CUDA path: pinned staging ring, device-side normalisation, same answers."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline.backends import TorchBackend
from pipeline.backends.staging import StagingRing
from pipeline.config import load_settings
from pipeline.engine import Engine
from pipeline.models import load_model
from pipeline.preprocess.pillow import PillowBackend
from pipeline.sources.directory import walk
from pipeline.spec import InputLimits, PreprocessSpec

pytestmark = pytest.mark.gpu
SHAPE = (3, 224, 224)


def test_staging_ring_is_pinned_and_reused() -> None:
    ring = StagingRing(3, 4, SHAPE, torch.device("cuda"))
    assert all(buffer.is_pinned() for buffer in ring.buffers)
    samples = [np.full(SHAPE, value, np.uint8) for value in (1, 2)]
    first = ring.stage(samples)
    assert first.is_cuda and first.shape == (2, *SHAPE)
    assert first[1].float().mean().item() == 2.0
    pointers = {ring.stage(samples).data_ptr() for _ in range(6)}
    assert len(ring.buffers) == 3 and len(pointers) >= 1


def test_cuda_logits_match_the_cpu(samples_dir: Path) -> None:
    model = load_model()
    pixels = PillowBackend(PreprocessSpec(), InputLimits()).run(
        [(samples_dir / name).read_bytes() for name in ("coffee.jpg", "rocket.jpg")])
    cpu = TorchBackend(model, torch.device("cpu"), 4, SHAPE)
    cpu.setup()
    expected = cpu.predict(pixels).clone()
    gpu = TorchBackend(load_model(), torch.device("cuda"), 4, SHAPE)
    gpu.setup()
    got = gpu.predict(pixels).cpu()
    assert torch.equal(got.argmax(1), expected.argmax(1))
    assert torch.allclose(got.softmax(1), expected.softmax(1), atol=1e-3)


def test_engine_scores_on_the_gpu(samples_dir: Path) -> None:
    settings = load_settings(overrides={"model.device": "cuda"})
    engine = Engine(settings)
    engine.setup()
    records: list[dict] = []
    try:
        summary = engine.run(walk(str(samples_dir)), records.extend)
    finally:
        engine.close()
    assert summary.scored == 6
    by_name = {Path(r["path"]).name: r for r in records}
    assert by_name["coffee.jpg"]["predictions"][0]["label"] == "espresso"
