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


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_hand_off_keeps_dalis_rows_on_the_gpu_with_the_hosts_answers(
        score_samples) -> None:
    # given the samples scored with DALI on the GPU, handing its batches to the
    # model as tensors there, and as host arrays
    from pipeline.config import load_settings

    scored = {}
    for output in ("device", "host"):
        settings = load_settings(overrides={
            "model.device": "cuda", "model.backend": "torch", "preprocess.backend": "dali",
            "preprocess.dali_in_process": "on", "preprocess.dali_output": output,
            "cache.enabled": False})
        summary, scored[output] = score_samples(settings)
        assert summary.scored == len(scored[output]), output
    # then both give the same top-5, with probabilities within 1e-4
    assert scored["device"].keys() == scored["host"].keys()
    for name, reference in scored["host"].items():
        got = scored["device"][name]["predictions"]
        expected = reference["predictions"]
        assert [p["index"] for p in got] == [p["index"] for p in expected], name
        assert all(abs(a["score"] - b["score"]) <= 1e-4
                   for a, b in zip(got, expected, strict=True)), name
