"""`imgpipe optimize`: pick the fastest inference variant that scores like eager fp32.

Each candidate variant (backend and precision) scores a validation set of real
photographs, preprocessed like production, next to the eager fp32 reference
(`pipeline.backends.validation`):

- on a labelled set (subdirectories named by class, or a labels CSV) a variant is
  accepted when its top-1 accuracy is at least 99% of eager fp32's on the same
  images (MLPerf's closed-division rule for quantized models);
- on unlabelled photographs, when its top-1 agreement with eager fp32 reaches
  the threshold (93% by default, from measurements on real photographs);
- judged on fewer than `MIN_JUDGED_IMAGES` images it is undecided, never accepted.

Where the model gives embeddings, each variant's pooled features are judged
too, against eager fp32's on the same images (pipeline/feature_guard.py:
cosine similarity at least 0.99, mean and minimum); the profile names the
fastest variant accepted for both as the one for embeddings.

int8 calibrates on the first `CALIBRATION_IMAGES` files of
`model.calibration_images` (`--calibration-images`), else of the validation
directory, and is never judged on those files. Of the accepted variants the
fastest model-only throughput wins, within a batch-of-one latency target if
given. The choice is written as a profile, keyed by model and weights digest,
which `score` and `serve` use when `model.backend = "auto"`.
"""

from __future__ import annotations

import logging
import os
import time
from dataclasses import asdict, dataclass, field, replace
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from pipeline import plans, prebuilt
from pipeline.backends import InferenceBackend, TorchBackend, Variant, backend_for
from pipeline.backends.calibration import (
    CALIBRATION_IMAGES,
    CalibrationSet,
    first_files,
    preprocessed,
)
from pipeline.backends.onnx import OnnxBackend
from pipeline.backends.validation import (
    DEFAULT_AGREEMENT,
    MIN_ACCURACY_RATIO,
    MIN_JUDGED_IMAGES,
    ClassNames,
    Judgement,
    ValidationSet,
    judge,
    probabilities,
    read_wnids,
    refusal,
    validation_set,
)
from pipeline.config import Settings
from pipeline.cores import usable_cores
from pipeline.errors import ConfigError, ImgpipeError, ModelLoadError, first_line
from pipeline.feature_guard import feature_agreement, features_of
from pipeline.feature_guard import refusal as feature_refusal
from pipeline.items import Job
from pipeline.models import LoadedModel
from pipeline.optimize_report import count as _count
from pipeline.plans import Plan
from pipeline.profiles import write_profile
from pipeline.spec import TTA_VIEWS
from pipeline.timing import percentiles, timed_calls

log = logging.getLogger("imgpipe.optimize")
MAX_VALIDATION_IMAGES = 500
# Images per plan (the validation set, repeated): a short run would measure
# filling and draining the pipeline more than running it.
PLAN_IMAGES = 400
# The setting named when a model cannot give the features judged for embeddings.
FEATURES_CHECK = "imgpipe optimize's features check"


@dataclass(frozen=True)
class Options:
    """What `imgpipe optimize` was asked (its flags)."""

    images: Path  # the validation set
    variants: Optional[list[Variant]] = None  # None: every variant the device runs
    threshold: float = DEFAULT_AGREEMENT  # unlabelled: least top-1 agreement
    min_ratio: float = MIN_ACCURACY_RATIO  # labelled: least accuracy, as a fraction of fp32's
    latency_ms: Optional[float] = None
    seconds: float = 3.0
    labels_csv: Optional[Path] = None
    wnids: Optional[Path] = None
    unlabelled: bool = False  # ignore labels: judge on agreement
    plan_images: int = PLAN_IMAGES  # per batch and thread plan measured; 0: none


@dataclass(frozen=True)
class Candidate:
    """One variant's accuracy and speed (zeros when it could not run)."""

    variant: str
    top1_agreement: float
    max_score_drift: float
    images: int  # validation images it was judged on
    images_per_s: float
    batch1_p50_ms: float
    accepted: bool
    why: str = ""
    top1: Optional[float] = None  # accuracy on a labelled set
    top5: Optional[float] = None
    reference_top1: Optional[float] = None  # eager fp32's, on the same images
    reference_top5: Optional[float] = None
    decided: bool = True  # False: judged on too few images to accept or refuse
    feature_cosine_mean: Optional[float] = None  # features against eager fp32's
    feature_cosine_min: Optional[float] = None
    embeddings_refused: Optional[str] = None  # why not for embeddings; None: accepted

    @property
    def for_embeddings(self) -> bool:
        return self.accepted and self.feature_cosine_min is not None \
            and self.embeddings_refused is None


@dataclass(frozen=True)
class Outcome:
    """Every candidate measured, the chosen variant (None when none qualifies), and
    what they were judged on."""

    candidates: list[Candidate]
    chosen: Optional[Variant]
    images: Path
    judged: int  # images in the validation set (int8 leaves out its calibration files)
    labelled_by: str  # "" when unlabelled
    rule: str  # the acceptance rule, in words
    reference: Judgement  # eager fp32's accuracy on the whole set, when labelled
    calibration: str  # what int8 calibrates on, in words ("" when no int8 variant)
    left_out: int = 0  # files not judged: without a label, or not decodable
    notes: list[str] = field(default_factory=list)  # said under the table
    plans: list[Plan] = field(default_factory=list)  # measured with the chosen variant
    plan: Optional[Plan] = None  # the fastest of them, written into the profile
    plan_images: int = 0  # images each plan was measured on
    embeddings: Optional[Variant] = None  # the fastest accepted for embeddings too


def run(settings: Settings, options: Options) -> Outcome:
    """Measure every candidate on `options.images` and write the fastest accepted one
    as the profile. ConfigError for a set without images or with unknown labels."""
    from pipeline.backends import resolve_device
    from pipeline.models import load_model
    from pipeline.variants import candidates as every_variant

    images = options.images
    if not first_files(images, 1):
        raise ConfigError(f"--images {images} holds no images")
    cfg = settings.model
    calibration_dir = cfg.calibration_images or images
    if not calibration_dir.is_dir():
        raise ConfigError(f"--calibration-images {calibration_dir} is not a directory")
    model = load_model(cfg.name, cfg.weights, cfg.labels)
    device = resolve_device(cfg.device)
    variants = options.variants or every_variant(device)
    vset = _validation_set(model, options)
    if not vset.files:
        raise ConfigError(f"--images {images} holds no images")
    pre = settings.preprocess
    decoded = preprocessed(list(vset.files), pre.spec(), pre.limits())
    if not decoded:
        count = len(vset.files)
        raise ConfigError(f"--images {images} holds no images: " + (
            "its one file does not decode as an image" if count == 1 else
            f"none of its {count} files decodes as an image"))
    paths = [path for path in vset.files if path in decoded]
    labels = None if vset.labels is None else [
        label for path, label in zip(vset.files, vset.labels, strict=True) if path in decoded]
    samples = [decoded[path] for path in paths]
    setting = _features_setting(model)
    reference = TorchBackend(model, device, settings.batching.max_batch_size,
                             pre.spec().output_shape, cfg.threads, embeddings=setting)
    reference.setup()
    try:
        expected = probabilities(reference, samples)
        features = None if setting is None else features_of(reference, samples)
    finally:
        reference.close()
    judged = _Judged(paths, samples, labels, expected, features)
    int8 = any(variant.precision == "int8" for variant in variants)
    calibration = _calibration_files(settings, calibration_dir) if int8 else frozenset()
    rule = (f"top-1 accuracy at least {options.min_ratio:.0%} of eager fp32's on the same "
            f"images" if labels is not None else
            f"top-1 agreement with eager fp32 at least {options.threshold:.0%}")
    held_out = judged.without(calibration)
    hint = (f" ({len(paths) - len(held_out.paths)} of the validation images calibrate it: "
            f"pass --calibration-images DIR with other photographs)"
            if len(held_out.paths) < len(paths) else "")
    candidates = [_candidate(settings, model, device, variant, calibration_dir,
                             held_out if variant.precision == "int8" else judged,
                             options, hint if variant.precision == "int8" else "")
                  for variant in variants]
    best = max((c for c in candidates if c.accepted), key=lambda c: c.images_per_s,
               default=None)
    chosen = Variant.parse(best.variant) if best is not None else None
    for_embeddings = max((c for c in candidates if c.for_embeddings),
                         key=lambda c: c.images_per_s, default=None)
    embeddings = Variant.parse(for_embeddings.variant) if for_embeddings else None
    plan, measured_plans = (_fastest_plan(settings, chosen, calibration_dir, paths,
                                          options.plan_images)
                            if chosen is not None and options.plan_images else (None, []))
    if chosen is not None and best is not None:
        int8 = "int8" in (chosen.precision, embeddings and embeddings.precision)
        write_profile(settings.cache.directory(), model, chosen,
                      calibration_dir.resolve() if int8 else None,
                      {"images": str(images.resolve()), "judged": best.images,
                       "labelled_by": vset.labelled_by or None, "rule": rule,
                       "min_accuracy_ratio": options.min_ratio if labels is not None else None,
                       "threshold": options.threshold if labels is None else None},
                      asdict(best), plan, embeddings, best.embeddings_refused or "")
    _record_for_torch_free_starts(settings, model, device, chosen, calibration_dir, best)
    notes = []
    if len(paths) < MIN_JUDGED_IMAGES:
        notes.append(f"the validation set is too small to decide: {_count(len(paths), 'image')}, "
                     f"at least {MIN_JUDGED_IMAGES} are needed; no variant is accepted "
                     f"on it")
    return Outcome(candidates, chosen, images, len(paths), vset.labelled_by, rule,
                   judge(expected, expected, labels),
                   _calibration_words(calibration_dir, images, len(calibration)) if int8
                   else "", vset.left_out + len(vset.files) - len(paths), notes,
                   measured_plans, plan, options.plan_images, embeddings)


def _features_setting(model: LoadedModel) -> Optional[str]:
    """What to build backends with to judge features; None (features not judged)
    where the model's head gives none."""
    from pipeline.models.features import FeatureTap

    try:
        FeatureTap(model, FEATURES_CHECK).close()
    except ModelLoadError as exc:
        log.info("features not judged: %s", exc)
        return None
    return FEATURES_CHECK


def _fastest_plan(settings: Settings, variant: Variant, calibration_dir: Path,
                  paths: list[str], images: int) -> tuple[Optional[Plan], list[Plan]]:
    """Each candidate plan (pipeline/plans.py) measured end to end with `variant`
    over `images` of `paths` (repeated as needed), and the fastest; None when none ran."""
    jobs = [paths[i % len(paths)] for i in range(images)]
    measured = [_plan_rate(settings, variant, calibration_dir, jobs, plan)
                for plan in plans.candidates(usable_cores())]
    ran = [plan for plan in measured if plan.images_per_s > 0]
    return max(ran, key=lambda plan: plan.images_per_s, default=None), measured


def _plan_rate(settings: Settings, variant: Variant, calibration_dir: Path,
               paths: list[str], plan: Plan) -> Plan:
    """`plan` with the images/s of a whole run (the engine, its workers, batching
    and `variant`) over `paths`, set-up excluded and the cache off; 0 if it fails."""
    from pipeline.engine import Engine

    batch = max(plan.max_batch_size, TTA_VIEWS[settings.preprocess.tta])
    trial = settings.model_copy(update={
        "model": settings.model.model_copy(update={
            "backend": variant.backend, "precision": variant.precision,
            "threads": plan.threads, "calibration_images": calibration_dir}),
        "preprocess": settings.preprocess.model_copy(update={"workers": plan.workers}),
        "batching": settings.batching.model_copy(update={"max_batch_size": batch}),
        "cache": settings.cache.model_copy(update={"enabled": False})})
    engine = Engine(trial)
    try:
        engine.setup()
        started = time.perf_counter()
        summary = engine.run([Job(path) for path in paths], lambda records: None)
        rate = summary.scored / (time.perf_counter() - started)
    except ImgpipeError as exc:
        log.warning("plan %s did not run: %s", plan.describe(), exc)
        rate = 0.0
    finally:
        engine.close()
    return replace(plan, images_per_s=rate)


def _record_for_torch_free_starts(settings: Settings, model: LoadedModel, device: Any,
                                  variant: Optional[Variant], calibration_dir: Path,
                                  best: Optional[Candidate]) -> None:
    """On the CPU, record the chosen ONNX Runtime export (pipeline.prebuilt), so that
    later starts run it without importing torch, as they run the default; forget an
    earlier choice otherwise."""
    store, key = settings.model.artifacts_directory(), prebuilt.key_for(settings, optimized=True)
    prebuilt.forget(store, key)
    if variant is None or best is None or variant.backend != "onnxruntime" \
            or device.type != "cpu":
        return
    backend = backend_for(settings, model, device, variant, calibration_dir)
    assert isinstance(backend, OnnxBackend)
    artifact = backend.store.path_for(backend.artifact_key())
    if artifact.is_file():  # built while it was measured
        card = prebuilt.ModelCard(model.name, list(model.labels), model.weights_digest)
        prebuilt.remember(store, key, prebuilt.Checked(
            card, str(artifact), artifact.stat().st_size, best.images, best.max_score_drift,
            str(variant), chosen_by_optimize=True))


def _validation_set(model: LoadedModel, options: Options) -> ValidationSet:
    if options.unlabelled:
        return validation_set(options.images, None, limit=MAX_VALIDATION_IMAGES)
    wnids = read_wnids(options.wnids, len(model.labels)) if options.wnids else None
    return validation_set(options.images, ClassNames(model.name, model.labels, wnids),
                          options.labels_csv, MAX_VALIDATION_IMAGES)


def _calibration_files(settings: Settings, directory: Path) -> frozenset[str]:
    """The real paths of the files int8 calibrates on (as `score` will)."""
    pre = settings.preprocess
    try:
        files = CalibrationSet.from_directory(directory, pre.spec(), pre.limits()).files
    except ImgpipeError as exc:
        raise ConfigError(str(exc)) from exc
    return frozenset(os.path.realpath(path) for path in files)


def _calibration_words(directory: Path, images: Path, count: int) -> str:
    same = os.path.realpath(directory) == os.path.realpath(images)
    where = f"--images {images}" if same else f"--calibration-images {directory}"
    return (f"int8 calibrates on {where} (its first {CALIBRATION_IMAGES} files in path "
            f"order: {count} here) and is never judged on those")


@dataclass(frozen=True)
class _Judged:
    """The validation images, their labels, and eager fp32's probabilities on them."""

    paths: list[str]
    samples: list[np.ndarray]
    labels: Optional[list[int]]
    expected: torch.Tensor
    features: Optional[np.ndarray] = None  # eager fp32's, where the model gives them

    def without(self, excluded: frozenset[str]) -> _Judged:
        keep = [i for i, path in enumerate(self.paths)
                if os.path.realpath(path) not in excluded]
        return _Judged([self.paths[i] for i in keep], [self.samples[i] for i in keep],
                       None if self.labels is None else [self.labels[i] for i in keep],
                       self.expected[keep],
                       None if self.features is None else self.features[keep])


def judged_on(variant: Variant, images: Path,
              samples: dict[str, np.ndarray]) -> list[np.ndarray]:
    """The samples (by path, from `images`) benchmarks/bench_optimize.py measures a
    variant's agreement on: int8 calibrates on the first files, so it is judged on
    the others (on all of them when there are no others: `optimize` itself leaves
    such a variant undecided instead)."""
    if variant.precision != "int8":
        return list(samples.values())
    calibration = set(first_files(images, CALIBRATION_IMAGES))
    held_out = [sample for path, sample in samples.items() if path not in calibration]
    return held_out or list(samples.values())


def _candidate(settings: Settings, model: LoadedModel, device: Any, variant: Variant,
               calibration_dir: Path, judged: _Judged, options: Options,
               hint: str = "") -> Candidate:
    """A variant measured, or refused with the reason it cannot run here."""
    setting = None if judged.features is None else FEATURES_CHECK
    no_features = None
    try:
        try:
            backend = backend_for(settings, model, device, variant, calibration_dir,
                                  embeddings=setting)
        except ModelLoadError as exc:  # it may still run for scores alone
            if setting is None:
                raise
            no_features, setting = first_line(exc), None
            backend = backend_for(settings, model, device, variant, calibration_dir)
        backend.setup()
    except (ImgpipeError, RuntimeError) as exc:
        return Candidate(str(variant), 0.0, 0.0, 0, 0.0, 0.0, False,
                         f"cannot run here: {first_line(exc)}")
    try:
        measured = _measure(str(variant), backend, judged, options, hint)
        if setting is None:
            return replace(measured, embeddings_refused=no_features)
        return _judge_features(measured, backend, judged)
    finally:
        backend.close()


def _judge_features(measured: Candidate, backend: InferenceBackend,
                    judged: _Judged) -> Candidate:
    """`measured` with its features' cosine to eager fp32's, and the verdict on them."""
    if judged.features is None or not judged.samples:
        return measured
    agreement = feature_agreement(judged.features, features_of(backend, judged.samples))
    return replace(measured, feature_cosine_mean=agreement.mean_cosine,
                   feature_cosine_min=agreement.min_cosine,
                   embeddings_refused=feature_refusal(agreement))


def _measure(name: str, backend: InferenceBackend, judged: _Judged, options: Options,
             hint: str = "") -> Candidate:
    """Judged, then timed: model-only images/s at the largest batch, batch-of-one p50.
    `hint` says why it may be judged on too few images."""
    if judged.samples:
        result = judge(judged.expected, probabilities(backend, judged.samples),
                       judged.labels)
        timing = judged.samples
    else:
        result = Judgement(0, 0.0, 0.0)
        timing = []
    full = [timing[i % len(timing)] for i in range(backend.max_batch_size)] if timing else []
    per_batch = timed_calls(lambda: backend.predict(full), options.seconds) if full else []
    single = timed_calls(lambda: backend.predict(full[:1]), options.seconds / 2) if full else []
    p50 = percentiles(single)[0] if single else 0.0
    why = refusal(result, options.threshold, options.min_ratio) if result.images else None
    decided = result.images >= MIN_JUDGED_IMAGES
    if not decided:
        verdict = (f"refused ({why})" if why else "accepted") if result.images else ""
        why = (f"undecided: judged on {_count(result.images, 'image')}, fewer than the "
               f"{MIN_JUDGED_IMAGES} needed{hint}" + (f"; on these it would be {verdict}"
                                                       if verdict else ""))
    elif why is None and options.latency_ms is not None and p50 > options.latency_ms:
        why = f"batch-of-one p50 {p50:.1f} ms over the {options.latency_ms:g} ms target"
    return Candidate(name, result.top1_agreement, result.max_score_drift,
                     result.images,
                     len(full) * len(per_batch) / sum(per_batch) if per_batch else 0.0,
                     p50, why is None, why or "", result.top1, result.top5,
                     result.reference_top1, result.reference_top5, decided)
