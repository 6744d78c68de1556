"""ONNX Runtime on the GPU (the `gpu` extra's onnxruntime-gpu): the session, bound on a
stream of its own, answers with tensors on the device, the CPU's answers, and the host
never waits for it; TensorRT, where installed, runs first and keeps its engine."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import ort_providers
from pipeline.backends.artifacts import ArtifactStore
from pipeline.backends.calibration import preprocessed
from pipeline.backends.onnx import OnnxBackend
from pipeline.config import load_settings
from pipeline.models import load_model
from pipeline.spec import InputLimits, PreprocessSpec

pytestmark = pytest.mark.gpu
ort = pytest.importorskip("onnxruntime")
SHAPE = (3, 224, 224)
CUDA0 = torch.device("cuda", 0)
BOTH = "model.output = 'both'"


@pytest.fixture(autouse=True)
def cuda_provider(monkeypatch) -> None:
    """The CUDA provider (TensorRT has a test of its own: its first build takes minutes)."""
    if ort_providers.CUDA not in ort.get_available_providers():
        pytest.skip("onnxruntime here is the CPU build: the `gpu` extra's onnxruntime-gpu")
    monkeypatch.setattr(ort_providers, "tensorrt_installed", lambda: False)


@pytest.fixture(scope="module")
def store(tmp_path_factory) -> ArtifactStore:
    return ArtifactStore(tmp_path_factory.mktemp("artifacts"))


@pytest.fixture(scope="module")
def pixels(samples_dir: Path) -> list[np.ndarray]:
    paths = sorted(str(path) for path in samples_dir.iterdir())
    return list(preprocessed(paths, PreprocessSpec(), InputLimits()).values())


def backend(store: ArtifactStore, device: torch.device, embeddings: str | None = None,
            max_batch_size: int = 8) -> OnnxBackend:
    onnx = OnnxBackend(load_model(), device, max_batch_size, SHAPE, store=store,
                       embeddings=embeddings)
    onnx.setup()
    return onnx


def photos_from(pixels: list[np.ndarray], start: int, count: int) -> list[np.ndarray]:
    return [pixels[(start + i) % len(pixels)] for i in range(count)]


def test_the_bound_session_gives_the_cpus_outputs_batch_after_batch(store, pixels) -> None:
    # given the default model with features on ONNX Runtime, on cuda:0 and on the CPU
    gpu, cpu = backend(store, CUDA0, BOTH), backend(store, torch.device("cpu"), BOTH)
    try:
        assert gpu.bound is not None and gpu.providers[0] == ort_providers.CUDA
        assert gpu.runner.runs_on_stream()

        # when batches of 5, 2 and 8 run back to back, none of them waited for
        batches = [photos_from(pixels, 0, 5), photos_from(pixels, 3, 2),
                   photos_from(pixels, 1, 8)]
        outputs = [gpu.predict_features(batch) for batch in batches]

        # then each answers on the device, one row per sample, with the CPU's numbers
        for batch, (logits, features) in zip(batches, outputs, strict=True):
            assert isinstance(logits, torch.Tensor) and isinstance(features, torch.Tensor)
            assert logits.device == features.device == CUDA0
            assert tuple(logits.shape) == (len(batch), 1000)
            expected_logits, expected_features = cpu.predict_features(batch)
            probabilities = torch.from_numpy(np.asarray(expected_logits)).softmax(1)
            assert torch.allclose(logits.softmax(1).cpu(), probabilities, atol=1e-3)
            cosines = torch.nn.functional.cosine_similarity(
                features.cpu(), torch.from_numpy(np.asarray(expected_features)), dim=1)
            assert bool((cosines > 0.999).all()), cosines
    finally:
        gpu.close()
        cpu.close()


def test_a_run_returns_before_the_device_and_is_read_only_once_written(store, pixels) -> None:
    gpu = backend(store, CUDA0)
    try:
        expected = gpu.predict(pixels[:4]).cpu()
        # given the session's stream held busy (a spin kernel of about a second)
        assert gpu.stream is not None
        with torch.cuda.stream(gpu.stream):
            torch.cuda._sleep(2_000_000_000)

        # when a batch runs behind it, and the caller copies its logits at once
        logits = gpu.predict(pixels[:4])
        finished = gpu.stream.query()
        copied = logits.clone()  # on the caller's stream

        # then the run returned before the device got to it (ONNX Runtime did not
        # synchronise), and the caller read what ONNX Runtime wrote, not the new
        # tensor's memory as it was
        assert not finished
        assert torch.allclose(copied.cpu(), expected, atol=1e-5)
    finally:
        gpu.close()


def test_the_engine_scores_with_onnxruntime_on_the_gpu(score_samples) -> None:
    summary, by_name = score_samples(load_settings(overrides={
        "model.device": "cuda", "model.backend": "onnxruntime"}))
    assert summary.scored == 6
    assert by_name["coffee.jpg"]["predictions"][0]["label"] == "espresso"


@pytest.mark.timeout(900)
def test_tensorrt_runs_first_where_installed_and_a_restart_loads_its_engine(
        store, pixels, monkeypatch) -> None:
    monkeypatch.undo()  # TensorRT as the host has it
    if not (ort_providers.tensorrt_installed()
            and ort_providers.TENSORRT in ort.get_available_providers()):
        pytest.skip("TensorRT is not installed")
    # given a first start, which builds the engine
    first = backend(store, CUDA0, max_batch_size=4)
    assert first.providers[0] == ort_providers.TENSORRT and first.bound is not None
    assert first.artifact is not None
    engines = store.directory / "tensorrt" / first.artifact.stem
    assert list(engines.glob("*.engine"))
    expected = first.predict(pixels[:4]).softmax(1).cpu()
    first.close()

    # when a second start opens the same export
    second = backend(store, CUDA0, max_batch_size=4)
    try:
        got = second.predict(pixels[:4]).softmax(1).cpu()
    finally:
        second.close()

    # then it answers as the first did, and as ONNX Runtime on the CPU does within
    # TensorRT's fp32 (which may use TF32)
    assert torch.allclose(got, expected, atol=1e-4)
    cpu = backend(store, torch.device("cpu"), max_batch_size=4)
    try:
        on_cpu = torch.from_numpy(np.asarray(cpu.predict(pixels[:4]))).softmax(1)
    finally:
        cpu.close()
    assert torch.equal(got.argmax(1), on_cpu.argmax(1))
    assert torch.allclose(got, on_cpu, atol=1e-2)
