"""The execution providers an ONNX Runtime session asks for (pipeline/ort_providers.py):
the CPU's alone on the CPU; on a GPU TensorRT where installed, then CUDA, both on
the stream given; whether a session reports running on it; and an OnnxRunner
whose TensorRT fails to start asking again without it."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path

import numpy as np
import pytest
import torch

from pipeline import ort_providers
from pipeline.backends.artifacts import ArtifactStore
from pipeline.backends.onnx import OnnxBackend
from pipeline.models import load_model
from pipeline.ort_providers import CPU, CUDA, TENSORRT, OnGpu, providers_for, runs_on_stream
from pipeline.prebuilt import INPUT_NAME, OnnxRunner
from tests.builders import MeanColour

ort = pytest.importorskip("onnxruntime")
InferenceSession = ort.InferenceSession  # the real one, while a test replaces it

SHAPE = (3, 224, 224)
MAX_BATCH = 8

GPU_BUILD = [TENSORRT, CUDA, CPU]
STREAM = 94_000_000


def names(providers: list) -> list[str]:
    return [entry[0] if isinstance(entry, tuple) else entry for entry in providers]


def test_the_cpu_asks_for_the_cpu_provider_alone(tmp_path: Path) -> None:
    assert providers_for([CPU], None, INPUT_NAME, MAX_BATCH, SHAPE) == [CPU]
    assert providers_for(GPU_BUILD, None, INPUT_NAME, MAX_BATCH, SHAPE) == [CPU]
    # a GPU placement with a CPU-only build: the CPU provider, nothing it cannot start
    assert providers_for(["AzureExecutionProvider", CPU], OnGpu(0, STREAM, tmp_path),
                         INPUT_NAME, MAX_BATCH, SHAPE) == [CPU]


def test_a_gpu_asks_for_tensorrt_then_cuda_on_one_stream(tmp_path: Path, monkeypatch) -> None:
    monkeypatch.setattr(ort_providers, "tensorrt_installed", lambda: True)
    providers = providers_for(GPU_BUILD, OnGpu(1, STREAM, tmp_path), INPUT_NAME, 32, SHAPE)

    assert names(providers) == [TENSORRT, CUDA, CPU]
    tensorrt, cuda = providers[0][1], providers[1][1]
    for options in (tensorrt, cuda):
        assert options["device_id"] == "1"
        assert options["user_compute_stream"] == str(STREAM)
        assert options["has_user_compute_stream"] == "1"
    assert cuda["use_tf32"] == "0"
    # engines kept where it was told, one profile from a batch of 1 to the largest
    assert tensorrt["trt_engine_cache_enable"] == "True"
    assert tensorrt["trt_engine_cache_path"] == str(tmp_path)
    assert tensorrt["trt_profile_min_shapes"] == "pixels:1x3x224x224"
    assert tensorrt["trt_profile_opt_shapes"] == tensorrt["trt_profile_max_shapes"] == \
        "pixels:32x3x224x224"


def test_tensorrt_is_asked_for_only_where_it_is_installed_and_wanted(tmp_path: Path,
                                                                   monkeypatch) -> None:
    monkeypatch.setattr(ort_providers, "tensorrt_installed", lambda: False)
    assert names(providers_for(GPU_BUILD, OnGpu(0, STREAM, tmp_path), INPUT_NAME,
                               MAX_BATCH, SHAPE)) == [CUDA, CPU]
    monkeypatch.setattr(ort_providers, "tensorrt_installed", lambda: True)
    assert names(providers_for(GPU_BUILD, OnGpu(0, STREAM), INPUT_NAME,
                               MAX_BATCH, SHAPE)) == [CUDA, CPU]
    # no stream given: ONNX Runtime keeps its own
    (_, cuda), _ = providers_for([CUDA, CPU], OnGpu(0), INPUT_NAME, MAX_BATCH, SHAPE)
    assert "user_compute_stream" not in cuda and "has_user_compute_stream" not in cuda


def test_a_session_runs_on_the_stream_only_as_its_providers_report_it() -> None:
    on_it = {"has_user_compute_stream": "1", "user_compute_stream": str(STREAM)}
    # CUDA reports the stream's address, TensorRT only the flag
    assert runs_on_stream([CUDA, CPU], {CUDA: on_it, CPU: {}}, STREAM)
    assert runs_on_stream([TENSORRT, CUDA, CPU],
                          {TENSORRT: {"has_user_compute_stream": "1"}, CUDA: on_it}, STREAM)
    # ONNX Runtime's defaults after a fallback, another stream, or no GPU provider at all
    defaults = {"has_user_compute_stream": "0", "user_compute_stream": "0"}
    assert not runs_on_stream([CUDA, CPU], {CUDA: defaults}, STREAM)
    assert not runs_on_stream([CUDA, CPU], {CUDA: on_it}, STREAM + 1)
    assert not runs_on_stream([TENSORRT, CUDA, CPU], {TENSORRT: {}, CUDA: on_it}, STREAM)
    assert not runs_on_stream([CPU], {CPU: {}}, STREAM)


class RefusesTensorrt:
    """An InferenceSession that fails to start the TensorRT provider, as one does where
    its libraries are missing."""

    asked: list[tuple[list[str], object]] = []

    def __init__(self, path: str, sess_options: object, providers: list,
                 **kwargs: object) -> None:
        RefusesTensorrt.asked.append((names(providers), kwargs.get("enable_fallback")))
        if TENSORRT in names(providers):
            raise RuntimeError("Failed to load libonnxruntime_providers_tensorrt.so\nmore")
        self.session = InferenceSession(path, sess_options=sess_options, providers=[CPU])
        self.providers = names(providers)

    def get_providers(self) -> list[str]:
        return self.providers

    def __getattr__(self, name: str) -> object:
        return getattr(self.session, name)


@pytest.fixture(scope="module")
def export(tmp_path_factory) -> Path:
    """A tiny model's ONNX export (the TorchScript exporter's: quick)."""
    folder = tmp_path_factory.mktemp("tiny")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", FutureWarning)  # TorchScript's deprecation
        torch.jit.trace(MeanColour(10).eval(), torch.zeros(2, 3, 32, 32)).save(
            folder / "tiny.pt")
        backend = OnnxBackend(load_model(str(folder / "tiny.pt")), torch.device("cpu"),
                              MAX_BATCH, SHAPE, store=ArtifactStore(folder / "artifacts"))
        backend.setup()
    backend.close()
    assert backend.artifact is not None
    return backend.artifact


def test_a_runner_whose_tensorrt_fails_to_start_runs_on_cuda(export, tmp_path: Path,
                                                            monkeypatch, caplog) -> None:
    # given a GPU build whose TensorRT provider cannot start
    monkeypatch.setattr(ort, "get_available_providers", lambda: GPU_BUILD)
    monkeypatch.setattr(ort, "InferenceSession", RefusesTensorrt)
    monkeypatch.setattr(ort_providers, "tensorrt_installed", lambda: True)
    RefusesTensorrt.asked = []
    runner = OnnxRunner(export, MAX_BATCH, SHAPE, gpu=OnGpu(0, 0, tmp_path))

    # when it opens the session
    with caplog.at_level(logging.WARNING, logger="imgpipe.prebuilt"):
        runner.open()

    # then it asked again without TensorRT (not left to ONNX Runtime's own fallback,
    # which drops the providers' options), said so in one line, and runs
    assert RefusesTensorrt.asked == [([TENSORRT, CUDA, CPU], 0), ([CUDA, CPU], 0)]
    assert runner.providers == [CUDA, CPU]
    (warning,) = caplog.messages
    assert "TensorRT cannot run" in warning and "\n" not in warning
    assert runner.run([np.zeros(SHAPE, np.uint8)]).shape == (1, 10)
