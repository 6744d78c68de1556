"""The CPU default, ONNX Runtime fp32, checked against eager PyTorch before first use.

The export is lossless in principle; the check makes sure of it for this
model, these weights and these library versions: both score the photographs
in `samples/` (real photographs, preprocessed as in production) and must give
the same top-1 on every one, with no probability further than
`MAX_SCORE_DRIFT` from eager's. What passes is recorded (`pipeline.prebuilt`)
so later starts skip the check and torch; the engine records a failure too,
so the export is not tried again until the model's files change, and runs
eager PyTorch instead.

For embeddings the export has the features output as well, and its features
must follow eager fp32's on the same photographs (pipeline/feature_guard.py:
cosine similarity at least 0.99, mean and minimum), or it is refused for them.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path
from typing import Optional

import torch

from pipeline.backends import TorchBackend, backend_for
from pipeline.backends.calibration import first_files, preprocessed
from pipeline.backends.onnx import OnnxBackend
from pipeline.backends.validation import agreement
from pipeline.config import Settings
from pipeline.errors import ModelLoadError
from pipeline.feature_guard import feature_agreement, features_of, refusal
from pipeline.models import LoadedModel
from pipeline.prebuilt import Checked, ModelCard
from pipeline.variants import Variant

log = logging.getLogger("imgpipe.backends.checked")

CHECK_PHOTOS = Path(__file__).resolve().parents[2] / "samples"
MAX_CHECK_PHOTOS = 32
MAX_SCORE_DRIFT = 1e-3  # measured: ~2e-6 for EfficientNet-Lite0; bf16 and int8 drift ~1e-2
DEFAULT_VARIANT = Variant("onnxruntime")


def checked_default(settings: Settings, model: LoadedModel, device: torch.device,
                    embeddings: Optional[str] = None) -> tuple[OnnxBackend, Checked]:
    """ONNX Runtime fp32 for `model`, set up, and the check it passed; with
    `embeddings` (the setting asking for them), the export with features.

    ModelLoadError naming the reason when it cannot be built, scores unlike
    eager PyTorch, or (for embeddings) its features drift from eager's.
    """
    candidate = backend_for(settings, model, device, DEFAULT_VARIANT, embeddings=embeddings)
    assert isinstance(candidate, OnnxBackend)
    if not candidate.store.path_for(candidate.artifact_key()).is_file():
        log.warning("first run of %s on this CPU: exporting it to ONNX Runtime and checking "
                    "it against eager PyTorch (once; about 20 s)...", model.name)
    started = time.perf_counter()
    candidate.setup()
    try:
        checked = _check(settings, model, device, candidate)
    except BaseException:
        candidate.close()
        raise
    if candidate.export_s:  # built now: say what the wait was for
        log.warning("%s ready in %.1f s: %s", model.name, time.perf_counter() - started,
                    checked.note())
    return candidate, checked


def _check(settings: Settings, model: LoadedModel, device: torch.device,
           candidate: OnnxBackend) -> Checked:
    pre = settings.preprocess
    photos = list(preprocessed(first_files(CHECK_PHOTOS, MAX_CHECK_PHOTOS), pre.spec(),
                               pre.limits()).values()) if CHECK_PHOTOS.is_dir() else []
    if not photos:
        raise ModelLoadError(f"no photographs to check the ONNX export against "
                             f"({CHECK_PHOTOS} holds none)")
    reference = TorchBackend(model, device, candidate.max_batch_size, pre.spec().output_shape,
                             settings.model.threads, embeddings=candidate.embeddings)
    reference.setup()
    try:
        result = agreement(reference, candidate, photos)
        features = (None if candidate.embeddings is None else
                    feature_agreement(features_of(reference, photos),
                                      features_of(candidate, photos)))
    finally:
        reference.close()
    if result.top1 < 1.0 or result.max_score_drift > MAX_SCORE_DRIFT:
        raise ModelLoadError(
            f"the ONNX export scores unlike eager PyTorch on {result.images} photographs "
            f"(top-1 agreement {result.top1:.1%}, largest probability difference "
            f"{result.max_score_drift:.2g})")
    if features is not None and (why := refusal(features)) is not None:
        raise ModelLoadError(f"the ONNX export is refused for embeddings: {why}")
    assert candidate.artifact is not None
    artifact = candidate.artifact
    return Checked(ModelCard(model.name, list(model.labels), model.weights_digest),
                   str(artifact), artifact.stat().st_size, result.images,
                   result.max_score_drift, features=features is not None,
                   feature_cosine_mean=None if features is None else features.mean_cosine,
                   feature_cosine_min=None if features is None else features.min_cosine)
