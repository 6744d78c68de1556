"""`imgpipe optimize`: pick the fastest inference variant that scores like eager fp32.

Each candidate variant (backend and precision) scores a validation set of real
images, preprocessed like production, next to the eager fp32 reference; one
under the agreement threshold is refused, whatever its speed. int8 variants
calibrate on the first `CALIBRATION_IMAGES` files of the same directory and
are validated on the others (on all of them when there are no others). Of the
accepted variants the fastest model-only throughput wins, within a
batch-of-one latency target if given. The choice is written as a profile,
keyed by model and weights digest, which `score` and `serve` use when
`model.backend = "auto"`.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline.backends import InferenceBackend, TorchBackend, Variant, backend_for
from pipeline.backends.calibration import CALIBRATION_IMAGES, first_files, preprocessed
from pipeline.backends.validation import agreement
from pipeline.config import Settings
from pipeline.errors import ImgpipeError, first_line
from pipeline.models import LoadedModel
from pipeline.profiles import write_profile
from pipeline.timing import percentiles, timed_calls

MAX_VALIDATION_IMAGES = 500


@dataclass(frozen=True)
class Candidate:
    """One variant's accuracy and speed (zeros when it could not run)."""

    variant: str
    top1_agreement: float
    max_score_drift: float
    images: int  # validation images its agreement was measured on
    images_per_s: float
    batch1_p50_ms: float
    accepted: bool
    why: str = ""


def run(settings: Settings, variants: Optional[list[Variant]], images: Path, threshold: float,
        latency_ms: Optional[float], seconds: float) -> tuple[list[Candidate], Optional[Variant]]:
    """Every candidate measured (by default, every variant the device runs), and
    the chosen variant (None when none qualifies)."""
    from pipeline.backends import resolve_device
    from pipeline.models import load_model
    from pipeline.variants import candidates as every_variant

    cfg = settings.model
    model = load_model(cfg.name, cfg.weights, cfg.labels)
    device = resolve_device(cfg.device)
    variants = variants or every_variant(device)
    pre = settings.preprocess
    every = preprocessed(first_files(images, MAX_VALIDATION_IMAGES), pre.spec(), pre.limits())
    if not every:
        raise ImgpipeError(f"{images} holds no images to validate with")
    reference = TorchBackend(model, device, settings.batching.max_batch_size,
                             pre.spec().output_shape, cfg.threads)
    reference.setup()
    candidates = []
    for variant in variants:
        candidates.append(_candidate(settings, model, device, variant, images, reference,
                                     judged_on(variant, images, every), threshold, latency_ms,
                                     seconds))
    reference.close()
    accepted = [c for c in candidates if c.accepted]
    best = max(accepted, key=lambda c: c.images_per_s, default=None)
    if best is None:
        return candidates, None
    variant = Variant.parse(best.variant)
    write_profile(settings.cache.directory(), model, variant,
                  images.resolve() if variant.precision == "int8" else None, threshold,
                  asdict(best))
    return candidates, variant


def judged_on(variant: Variant, images: Path,
              samples: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The samples (by path, from `images`) a variant's agreement is measured on:
    int8 calibrates on the first files, so it is judged on the others (on all of
    them when there are no others)."""
    if variant.precision != "int8":
        return list(samples.values())
    calibration = set(first_files(images, CALIBRATION_IMAGES))
    held_out = [sample for path, sample in samples.items() if path not in calibration]
    return held_out or list(samples.values())


def _candidate(settings: Settings, model: LoadedModel, device: Any, variant: Variant,
               images: Path, reference: TorchBackend, samples: list[np.ndarray],
               threshold: float, latency_ms: Optional[float], seconds: float) -> Candidate:
    """A variant measured, or refused with the reason it cannot run here."""
    try:
        backend = backend_for(settings, model, device, variant, images)
        backend.setup()
    except (ImgpipeError, RuntimeError) as exc:
        return Candidate(str(variant), 0.0, 0.0, 0, 0.0, 0.0, False,
                         f"cannot run here: {first_line(exc)}")
    try:
        return _measure(str(variant), backend, reference, samples, threshold, latency_ms,
                        seconds)
    finally:
        backend.close()


def _measure(name: str, backend: InferenceBackend, reference: TorchBackend,
             samples: list[np.ndarray], threshold: float, latency_ms: Optional[float],
             seconds: float) -> Candidate:
    result = agreement(reference, backend, samples)
    full = [samples[i % len(samples)] for i in range(reference.max_batch_size)]
    per_batch = timed_calls(lambda: backend.predict(full), seconds)
    single = timed_calls(lambda: backend.predict(full[:1]), seconds / 2)
    p50, _ = percentiles(single)
    why = ""
    if result.top1 < threshold:
        why = f"top-1 agreement {result.top1:.2%} under the {threshold:.2%} threshold"
    elif latency_ms is not None and p50 > latency_ms:
        why = f"batch-of-one p50 {p50:.1f} ms over the {latency_ms:g} ms target"
    return Candidate(name, result.top1, result.max_score_drift, result.images,
                     len(full) * len(per_batch) / sum(per_batch), p50, not why, why)
