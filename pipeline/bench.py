"""`imgpipe bench`: what each backend does on this machine, measured in one run.

Three measurements, each a table row per variant:
- model only: random uint8 batches through each inference backend at each
  batch size; images/s and the p50/p99 latency of one batch;
- preprocessing only: the images of a directory, one at a time, through each
  preprocessing backend in this process; images/s per core;
- end to end: the engine over the directory (cache off), per inference backend.
"""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass
from functools import partial
from pathlib import Path
from typing import Any, Optional

import numpy as np

from pipeline.config import Settings
from pipeline.errors import ImgpipeError, first_line
from pipeline.items import Job
from pipeline.timing import percentiles, timed_calls
from pipeline.variants import Variant

WARMUP_CALLS = 3


@dataclass(frozen=True)
class Row:
    """One measured variant."""

    stage: str  # "model", "preprocess" or "end to end"
    variant: str  # e.g. "onnxruntime, batch 32"
    images_per_s: float
    p50_ms: Optional[float] = None
    p99_ms: Optional[float] = None
    note: str = ""


def run(settings: Settings, variants: Optional[Sequence[Variant]], batch_sizes: Sequence[int],
        images: Path, seconds: float) -> list[Row]:
    """Every measurement (by default of every variant the device runs); a variant
    that cannot run here is a row saying why. int8 calibrates on `images`."""
    from pipeline.backends import resolve_device
    from pipeline.variants import candidates

    files = sorted(str(p) for p in images.iterdir() if p.is_file() and not p.name.startswith("."))
    if not files:
        raise ImgpipeError(f"{images} holds no files to measure with")
    variants = variants or candidates(resolve_device(settings.model.device))
    settings = settings.model_copy(update={"model": settings.model.model_copy(
        update={"calibration_images": images})})
    rows = []
    for variant in variants:
        for size in batch_sizes:
            rows.append(_guarded("model", f"{variant}, batch {size}",
                                 partial(_model_only, settings, variant, size, seconds)))
    for name in ("pillow", "dali"):
        rows.append(_guarded("preprocess", name,
                             partial(_preprocess, settings, name, files, seconds)))
    for variant in variants:
        rows.append(_guarded("end to end", str(variant),
                             partial(_end_to_end, settings, variant, files)))
    return rows


def _guarded(stage: str, variant: str, measure: Callable[[], Row]) -> Row:
    try:
        return measure()
    except (ImgpipeError, ImportError, RuntimeError) as exc:
        return Row(stage, variant, 0.0, note=f"not measured: {first_line(exc)}")


def _model_only(settings: Settings, variant: Variant, batch_size: int, seconds: float) -> Row:
    from pipeline.backends import backend_for, resolve_device
    from pipeline.models import load_model

    cfg = settings.model
    shape = settings.preprocess.spec().output_shape
    model = load_model(cfg.name, cfg.weights, cfg.labels)
    backend = backend_for(settings, model, resolve_device(cfg.device), variant,
                          cfg.calibration_images, batch_size)
    backend.setup()
    batch = list(np.random.default_rng(0).integers(0, 256, (batch_size, *shape), dtype=np.uint8))
    for _ in range(WARMUP_CALLS):
        backend.predict(batch)
    latencies = timed_calls(lambda: backend.predict(batch), seconds)
    backend.close()
    return Row("model", f"{variant}, batch {batch_size}",
               batch_size * len(latencies) / sum(latencies), *percentiles(latencies))


def _preprocess(settings: Settings, backend_name: str, files: list[str], seconds: float) -> Row:
    """Pillow as one worker process runs it, an image per call; DALI as the engine
    runs it, on the model's device (nvJPEG on a GPU), a model batch per call."""
    from pipeline.backends import resolve_device
    from pipeline.cores import usable_cores
    from pipeline.preprocess.select import create_backend
    from pipeline.sources.files import read_file

    pre = settings.preprocess
    batch, device, threads = 1, "cpu", 1
    if backend_name == "dali":
        model_device = resolve_device(settings.model.device)
        batch, threads = settings.batching.max_batch_size, usable_cores()
        device = str(model_device) if model_device.type == "cuda" else "cpu"
    backend = create_backend(backend_name, pre.spec(), pre.limits(), device, threads,
                             pre.decoder_hints())
    backend.setup()
    payloads = itertools.cycle([read_file(path, pre.max_file_bytes) for path in files])
    latencies = timed_calls(lambda: backend.run([next(payloads) for _ in range(batch)]),
                            seconds)
    backend.close()
    note = ("one process, one image per call" if batch == 1
            else f"{device}, {threads} threads, {batch} images per call; latency per call")
    return Row("preprocess", backend_name, batch * len(latencies) / sum(latencies),
               *percentiles(latencies), note=note)


def _end_to_end(settings: Settings, variant: Variant, files: list[str]) -> Row:
    from pipeline.engine import Engine

    engine = Engine(settings.model_copy(update={
        "model": settings.model.model_copy(update={"backend": variant.backend,
                                                   "precision": variant.precision}),
        "cache": settings.cache.model_copy(update={"enabled": False})}))
    try:
        engine.setup()
        summary = engine.run((Job(path) for path in files), lambda records: None)
    finally:
        engine.close()
    return Row("end to end", str(variant), summary.images_per_s,
               note=f"{summary.total} images, {engine.preprocess_backend} preprocessing")


def as_dicts(rows: list[Row]) -> list[dict[str, Any]]:
    return [asdict(row) for row in rows]


def table(rows: list[Row]) -> list[str]:
    """The rows as aligned text lines, with the machine they ran on."""
    lines = [f"{os.cpu_count()} cores; latency is per call (a batch, or one image)",
             f"{'stage':<11} {'variant':<24} {'images/s':>9} {'p50 ms':>8} {'p99 ms':>8}  note"]
    for row in rows:
        p50 = f"{row.p50_ms:8.1f}" if row.p50_ms is not None else f"{'':>8}"
        p99 = f"{row.p99_ms:8.1f}" if row.p99_ms is not None else f"{'':>8}"
        lines.append(f"{row.stage:<11} {row.variant:<24} {row.images_per_s:9.1f} {p50} {p99}"
                     f"  {row.note}")
    return lines
