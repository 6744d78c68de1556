"""Inference backends: setup(), predict(uint8 batch) -> logits, close()."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Protocol

import numpy as np
import torch

from pipeline.backends.artifacts import ArtifactStore
from pipeline.backends.calibration import CalibrationSet
from pipeline.backends.devices import resolve_device
from pipeline.backends.torch import TorchBackend
from pipeline.config import Settings
from pipeline.errors import ModelLoadError
from pipeline.items import Pixels
from pipeline.models import LoadedModel
from pipeline.prebuilt import ModelCard
from pipeline.variants import Variant

__all__ = ["FeaturesBackend", "InferenceBackend", "TorchBackend", "Variant", "backend_for",
           "create_inference_backend", "resolve_device"]

INDUCTOR_SUBDIR = "inductor"


class InferenceBackend(Protocol):
    """Runs one LoadedModel on one device; heavy work happens in setup()."""

    name: str
    max_batch_size: int
    warmup_s: float

    @property
    def model(self) -> LoadedModel | ModelCard: ...

    @property
    def last_staging_s(self) -> float: ...

    def setup(self) -> None: ...

    def predict(self, samples: Sequence[Pixels]) -> torch.Tensor | np.ndarray: ...

    def close(self) -> None: ...


class FeaturesBackend(InferenceBackend, Protocol):
    """A backend that also gives each sample's pooled penultimate features."""

    def predict_features(self, samples: Sequence[Pixels]
                         ) -> tuple[torch.Tensor | np.ndarray, torch.Tensor | np.ndarray]: ...


def create_inference_backend(variant: Variant, model: LoadedModel, device: torch.device,
                             max_batch_size: int, sample_shape: tuple[int, int, int],
                             threads: int, artifacts_dir: Path,
                             calibration: Optional[CalibrationSet] = None,
                             embeddings: Optional[str] = None) -> InferenceBackend:
    """The backend for `variant`; what it builds is kept in `artifacts_dir`.
    `embeddings` (the setting that asks for them) makes it give features too
    (predict_features), from the same graph as the logits.

    ModelLoadError when the variant cannot run on `device`, or give embeddings.
    """
    variant.validate()
    reason = variant.unavailable(device)
    if reason is not None:
        raise ModelLoadError(reason)
    store = ArtifactStore(artifacts_dir)
    args = (model, device, max_batch_size, sample_shape, threads)
    if variant.backend == "onnxruntime":
        from pipeline.backends.onnx import OnnxBackend

        return OnnxBackend(*args, store=store, precision=variant.precision,
                           calibration=calibration, embeddings=embeddings)
    if variant.backend == "torchscript":
        from pipeline.backends.torchscript import TorchScriptBackend

        return TorchScriptBackend(*args, store=store, embeddings=embeddings)
    compiled = variant.backend in ("torch-compile", "torch-graphs")
    return TorchBackend(*args, precision=variant.precision, embeddings=embeddings,
                        compile_cache=store.directory / INDUCTOR_SUBDIR if compiled else None,
                        graphs=variant.backend == "torch-graphs")


def backend_for(settings: Settings, model: LoadedModel, device: torch.device, variant: Variant,
                calibration_images: Optional[Path] = None,
                max_batch_size: Optional[int] = None,
                embeddings: Optional[str] = None) -> InferenceBackend:
    """`create_inference_backend` with everything else taken from `settings`."""
    pre = settings.preprocess
    calibration = None
    if variant.precision == "int8" and calibration_images is not None:
        calibration = CalibrationSet.from_directory(calibration_images, pre.spec(), pre.limits())
    return create_inference_backend(
        variant, model, device, max_batch_size or settings.batching.max_batch_size,
        pre.spec().output_shape, settings.model.threads, settings.model.artifacts_directory(),
        calibration, embeddings)
