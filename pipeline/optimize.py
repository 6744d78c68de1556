"""`imgpipe optimize`: pick the fastest inference variant that scores like eager fp32.

Each candidate backend scores a validation set of real images (preprocessed
like production) next to the eager fp32 reference; one under the agreement
threshold is refused, whatever its speed. Of the rest, the fastest model-only
throughput wins (within a batch-of-one latency target, if given). The choice
is written as a profile, keyed by model and weights digest, which `score` and
`serve` use when `model.backend = "auto"`.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline.backends import InferenceBackend, TorchBackend, create_inference_backend
from pipeline.backends.validation import Agreement, agreement
from pipeline.config import Settings
from pipeline.errors import ImgpipeError
from pipeline.models import LoadedModel

PROFILES_SUBDIR = "profiles"
MAX_VALIDATION_IMAGES = 500


@dataclass(frozen=True)
class Candidate:
    """One variant's accuracy and speed."""

    backend: str
    top1_agreement: float
    max_score_drift: float
    images_per_s: float
    batch1_p50_ms: float
    accepted: bool
    why: str = ""


def profile_path(cache_dir: Path, model: LoadedModel) -> Path:
    slug = "".join(c if c.isalnum() or c in "._-" else "_" for c in Path(model.name).name)
    return cache_dir / PROFILES_SUBDIR / f"{slug}-{model.weights_digest[:16]}.json"


def chosen_backend(cache_dir: Path, model: LoadedModel) -> Optional[str]:
    """The backend `optimize` chose for this model and these weights, if it ran."""
    try:
        profile = json.loads(profile_path(cache_dir, model).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    backend = profile.get("backend") if isinstance(profile, dict) else None
    return backend if isinstance(backend, str) else None


def run(settings: Settings, backends: list[str], images: Path, threshold: float,
        latency_ms: Optional[float], seconds: float) -> tuple[list[Candidate], Optional[str]]:
    """Every candidate measured, and the chosen backend (None when none qualifies)."""
    from pipeline.backends import resolve_device
    from pipeline.models import load_model

    cfg = settings.model
    model = load_model(cfg.name, cfg.weights, cfg.labels)
    device = resolve_device(cfg.device)
    shape = settings.preprocess.spec().output_shape
    batch = settings.batching.max_batch_size
    samples = validation_set(settings, images)
    reference = TorchBackend(model, device, batch, shape, cfg.threads)
    reference.setup()
    candidates = []
    for name in backends:
        backend = create_inference_backend(name, model, device, batch, shape, cfg.threads,
                                           settings.cache.directory())
        backend.setup()
        candidates.append(_measure(name, backend, reference, samples, threshold, latency_ms,
                                   seconds))
        backend.close()
    reference.close()
    accepted = [c for c in candidates if c.accepted]
    best = max(accepted, key=lambda c: c.images_per_s, default=None)
    if best is not None:
        _write_profile(settings.cache.directory(), model, best, threshold, len(samples))
    return candidates, best.backend if best is not None else None


def validation_set(settings: Settings, images: Path) -> list[np.ndarray]:
    """The directory's images preprocessed as in production (pillow), undecodable ones skipped."""
    from pipeline.preprocess import create_backend
    from pipeline.sources import directory
    from pipeline.sources.files import read_file

    pre = settings.preprocess
    backend = create_backend("pillow", pre.spec(), pre.limits())
    samples = []
    for job in directory.walk(str(images), recursive=True):
        try:
            outcome = backend.run([read_file(job.path, pre.max_file_bytes)])[0]
        except ImgpipeError:
            continue
        if isinstance(outcome, np.ndarray):
            samples.append(outcome)
        if len(samples) >= MAX_VALIDATION_IMAGES:
            break
    if not samples:
        raise ImgpipeError(f"{images} holds no images to validate with")
    return samples


def _measure(name: str, backend: InferenceBackend, reference: TorchBackend,
             samples: list[np.ndarray], threshold: float, latency_ms: Optional[float],
             seconds: float) -> Candidate:
    from pipeline.bench import percentiles, timed_calls  # the same measures as `bench`

    result: Agreement = agreement(reference, backend, samples)
    full = [samples[i % len(samples)] for i in range(reference.max_batch_size)]
    per_batch = timed_calls(lambda: backend.predict(full), seconds)
    single = timed_calls(lambda: backend.predict(full[:1]), seconds / 2)
    p50, _ = percentiles(single)
    why = ""
    if result.top1 < threshold:
        why = f"top-1 agreement {result.top1:.2%} under the {threshold:.2%} threshold"
    elif latency_ms is not None and p50 > latency_ms:
        why = f"batch-of-one p50 {p50:.1f} ms over the {latency_ms:g} ms target"
    return Candidate(name, result.top1, result.max_score_drift,
                     len(full) * len(per_batch) / sum(per_batch), p50, not why, why)


def _write_profile(cache_dir: Path, model: LoadedModel, best: Candidate, threshold: float,
                   images: int) -> None:
    path = profile_path(cache_dir, model)
    path.parent.mkdir(parents=True, exist_ok=True)
    profile: dict[str, Any] = {"model": model.name, "weights_digest": model.weights_digest,
                               "backend": best.backend, "threshold": threshold,
                               "validation_images": images, "chosen_at": time.time(),
                               "measured": asdict(best)}
    tmp = path.with_suffix(".tmp")
    tmp.write_text(json.dumps(profile, indent=2) + "\n", encoding="utf-8")
    tmp.replace(path)
