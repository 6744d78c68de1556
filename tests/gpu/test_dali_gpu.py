"""DaliBackend with nvJPEG ("mixed" decoder) against the DALI CPU decoder."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest

torch = pytest.importorskip("torch")
pytest.importorskip("nvidia.dali")

from pipeline.preprocess.dali import DaliBackend  # noqa: E402
from pipeline.spec import InputLimits, PreprocessSpec  # noqa: E402

SAMPLES = Path(__file__).resolve().parents[2] / "samples"


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_mixed_decoder_matches_cpu() -> None:
    images = [p.read_bytes() for p in sorted(SAMPLES.iterdir()) if p.suffix in (".jpg", ".png")]
    truncated = images[0][: len(images[0]) // 2]
    images.insert(1, truncated)  # a failing sample must not fail the GPU batch either
    spec, limits = PreprocessSpec(), InputLimits()
    outcomes = {}
    for device in ("cpu", "cuda"):
        backend = DaliBackend(spec, limits, device=device, batch_size=4)
        backend.setup()
        outcomes[device] = backend.run(images)
        backend.close()
    for cpu, gpu in zip(outcomes["cpu"], outcomes["cuda"], strict=True):
        if isinstance(cpu, np.ndarray):
            assert isinstance(gpu, np.ndarray) and gpu.shape == cpu.shape == spec.output_shape
            assert np.abs(cpu.astype(np.int16) - gpu).mean() <= 2
        else:
            assert getattr(gpu, "code", None) == cpu.code == "truncated"
