"""The engine with each inference variant, against its stages and the baseline
script: the engine-only diagnostics (the whole command is bench_command's).

On the first --images files of the mixed-size directory: preprocessing only
(imgpipe's pool, no model); per model, (b) the baseline script; per model and
variant (backend:precision), top-1 agreement and the largest softmax drift
against eager fp32 (int8 on the files it was not calibrated on, as `imgpipe
optimize` judges it), model only (its backend on batches of 32 real
preprocessed images) and end to end (Engine.run in a fresh process with the
command's environment); then the chosen variant (what `imgpipe optimize`
picks) end to end under other settings. Each rate is the best of --repeats
interleaved runs; the result cache is off; artifacts (ONNX, int8,
TorchScript) are kept under benchmarks/data/ and built before any timing.

    .venv/bin/python -m benchmarks.bench_optimize [--models ...] [--variants ...] [--quick]
"""

from __future__ import annotations

import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from benchmarks import datasets, harness
from benchmarks.harness import BATCH, CORES, log
from pipeline.errors import ConfigError
from pipeline.variants import Variant

if TYPE_CHECKING:
    import numpy as np

    from pipeline.backends import TorchBackend
    from pipeline.config import Settings
    from pipeline.models import LoadedModel

# Each model's variants: EfficientNet-Lite0 is the default model (ImageNet
# weights), MobileNetV3-Small the preprocessing-bound one (random weights, which
# do not change its speed; bf16 and int8 cannot be judged on them).
MODELS = {"efficientnet_lite0": ("torch", "torchscript", "torch:bf16", "onnxruntime",
                                 "onnxruntime:int8"),
          "mobilenet_v3_small": ("torch", "onnxruntime")}
TARGET_SPEEDUP = {"efficientnet_lite0": 5.0, "mobilenet_v3_small": 2.0}  # x (b)
TARGET_AGREEMENT, TARGET_END_TO_END = 0.99, 0.85
# The chosen variant end to end under other settings: (name, overrides, env).
# OMP_WAIT_POLICY=ACTIVE shows what the command's own PASSIVE buys.
SWEEP: tuple[tuple[str, dict[str, Any], dict[str, str]], ...] = (
    ("model.threads=1", {"model.threads": 1}, {}),
    ("preprocess.workers=1", {"preprocess.workers": 1}, {}),
    ("model.threads=1, preprocess.workers=1",
     {"model.threads": 1, "preprocess.workers": 1}, {}),
    ("env OMP_WAIT_POLICY=ACTIVE (spinning threads)", {}, {"OMP_WAIT_POLICY": "ACTIVE"}),
)
CACHE_DIR = datasets.DATA / "optimize-cache"  # artifacts survive between runs
# Model only runs with the command's thread policy, like the end-to-end runs it
# is compared with. Nothing imported above loads torch.
os.environ.update(harness.IMGPIPE_ENV)


@dataclass
class VariantResult:
    """One variant: its agreement with eager fp32 and every run in images/s."""

    variant: str
    top1: float = 0.0
    max_score_drift: float = 0.0
    agreement_images: int = 0
    held_out: bool = False  # agreement measured on images int8 was not calibrated on
    model_only: list[float] = field(default_factory=list)
    end_to_end: list[float] = field(default_factory=list)
    setup_s: list[float] = field(default_factory=list)  # Engine.setup() in the fresh process
    failed: str = ""

    @property
    def accepted(self) -> bool:
        return not self.failed and self.top1 >= TARGET_AGREEMENT

    def best(self, key: str) -> float:
        return max(getattr(self, key), default=0.0)

    def shared_cpu_bound(self, preprocess_only: float) -> float:
        """End to end if model and preprocessing take turns on the same cores at full
        speed: the best a CPU-only machine allows."""
        return 1.0 / (1.0 / self.best("model_only") + 1.0 / preprocess_only)


@dataclass
class ModelResult:
    """One model: the baseline's runs, each variant, the settings sweep."""

    model: str
    variants: list[VariantResult]
    baseline: list[float] = field(default_factory=list)
    sweep: dict[str, list[float]] = field(default_factory=dict)

    @property
    def chosen(self) -> Optional[VariantResult]:
        """What `imgpipe optimize` picks: the fastest model only among accepted variants."""
        return max((r for r in self.variants if r.accepted), key=lambda r: r.best("model_only"),
                   default=None)


def parse_args(argv: Optional[list[str]]) -> Any:
    parser = harness.parser(__doc__, "100 images, one repeat, 3 s of model only")
    parser.add_argument("--images", type=int, default=400,
                        help="first files of the generated directory (default 400)")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--variants", nargs="+",
                        help="backend[:precision] for every model (default: each model's "
                             "own list; torch-compile also runs, after a compile of minutes)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="interleaved runs of each measurement; the best counts")
    parser.add_argument("--model-seconds", type=float, default=10.0,
                        help="how long model only runs per variant, over all repeats")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false",
                        help="skip the chosen variant under alternative settings")
    args = parser.parse_args(argv)
    try:
        args.variants = [str(Variant.parse(text)) for text in args.variants or []]
    except ConfigError as exc:
        parser.error(str(exc))
    if args.quick:
        args.images, args.repeats, args.model_seconds = 100, 1, 3.0
    args.repeats = max(1, args.repeats)
    return args


# ---------------------------------------------------------------- model only, agreement


def validation_samples(directory: Path, settings: Settings) -> dict[str, np.ndarray]:
    """{path: uint8 CHW} for every image, in path order, preprocessed as in production."""
    from pipeline.backends.calibration import first_files, preprocessed

    pre = settings.preprocess
    files = first_files(directory, len(datasets.list_images(directory)))
    return preprocessed(files, pre.spec(), pre.limits())


def measure_model(variant: Variant, settings: Settings, model: LoadedModel,
                  reference: TorchBackend, directory: Path, samples: dict[str, np.ndarray],
                  args: Any) -> VariantResult:
    """Build the variant's backend (its artifact too, if missing), then agreement and
    model only; a variant that cannot run here is recorded with the reason."""
    from pipeline.backends import backend_for
    from pipeline.backends.validation import agreement
    from pipeline.errors import ImgpipeError, first_line
    from pipeline.optimize import judged_on

    result = VariantResult(str(variant))
    try:
        backend = backend_for(settings, model, reference.device, variant, directory, BATCH)
        backend.setup()
    except (ImgpipeError, RuntimeError, ImportError) as exc:
        result.failed = f"cannot run here: {first_line(exc)}"
        return result
    try:
        scored = judged_on(variant, directory, samples)
        result.held_out = len(scored) < len(samples)
        found = agreement(reference, backend, scored)
        result.top1, result.max_score_drift = found.top1, found.max_score_drift
        result.agreement_images = found.images
        every = list(samples.values())
        batch = [every[i % len(every)] for i in range(BATCH)]
        for _ in range(args.repeats):
            result.model_only.append(harness.images_per_s(
                lambda: backend.predict(batch), BATCH, args.model_seconds / args.repeats))
    finally:
        backend.close()
    return result


def model_phase(model_name: str, directory: Path, args: Any) -> ModelResult:
    """Every variant's agreement and model only, against one eager fp32 reference."""
    import torch

    from pipeline.backends import TorchBackend
    from pipeline.models import load_model

    settings = harness.settings(model_name, {"cache.dir": str(CACHE_DIR)})
    samples = validation_samples(directory, settings)
    model = load_model(settings.model.name, settings.model.weights, settings.model.labels)
    reference = TorchBackend(model, torch.device("cpu"), BATCH,
                             settings.preprocess.spec().output_shape, settings.model.threads)
    reference.setup()
    result = ModelResult(model_name, [])
    for text in args.variants or MODELS[model_name]:
        log(f"{model_name} {text}: build, agreement over {len(samples)} images, model only")
        measured = measure_model(Variant.parse(text), settings, model, reference, directory,
                                 samples, args)
        log(f"{model_name} {text}: {measured.failed or f'top-1 {measured.top1:.2%}'}, "
            f"model only {measured.best('model_only'):.1f} images/s")
        result.variants.append(measured)
    reference.close()
    return result


# ---------------------------------------------------------------- end to end


def measure_pool(directory: Path) -> float:
    """Preprocessing only: images/s of imgpipe's PreprocessPool (defaults, pillow, one
    worker per core) over the directory, no model."""
    from pipeline.config import load_settings
    from pipeline.preprocess.pool import PreprocessPool, WorkerPlan
    from pipeline.sources import directory as directory_source

    pre = load_settings(overrides={"model.device": "cpu"}).preprocess
    pool = PreprocessPool(WorkerPlan("pillow", pre.spec(), pre.limits()), CORES,
                          pre.chunk_size)
    pool.start()
    seen = 0
    started = time.perf_counter()
    try:
        for item in pool.map(directory_source.walk(str(directory))):
            if item.error is not None:
                raise RuntimeError(f"{item.job.path}: {item.error}")
            seen += 1
    finally:
        elapsed = time.perf_counter() - started
        pool.close()
    return seen / elapsed


def end_to_end(model: str, variant: str, directory: Path, overrides: dict[str, Any],
               env: Optional[dict[str, str]] = None) -> tuple[float, float] | str:
    """Engine.run with `variant` in a fresh process: (images/s, setup s), or why it
    failed. int8 calibrates on the scored directory."""
    parsed = Variant.parse(variant)
    try:
        return harness.engine_run_fresh(model, directory, {
            "model.backend": parsed.backend, "model.precision": parsed.precision,
            "model.calibration_images": str(directory), "cache.dir": str(CACHE_DIR),
            **overrides}, env)
    except RuntimeError as exc:
        return f"end to end failed: {str(exc).strip().splitlines()[-1]}"


def score_phase(results: list[ModelResult], directory: Path, args: Any) -> list[float]:
    """Preprocessing only, then each model's (b) and runnable variants end to end,
    interleaved; the runs of preprocessing only."""
    preprocess_only = []
    for attempt in range(args.repeats):
        log(f"preprocessing only, (b) and end to end, run {attempt + 1}/{args.repeats}")
        preprocess_only.append(measure_pool(directory))
        for model in results:
            model.baseline.append(harness.baseline_rate(model.model, directory))
            log(f"{model.model} (b): {model.baseline[-1]:.1f} images/s")
            for result in (r for r in model.variants if not r.failed):
                measured = end_to_end(model.model, result.variant, directory, {})
                if isinstance(measured, str):
                    result.failed = measured
                else:
                    result.end_to_end.append(measured[0])
                    result.setup_s.append(measured[1])
                log(f"{model.model} {result.variant} end to end: "
                    f"{result.failed or f'{measured[0]:.1f} images/s'}")
    return preprocess_only


def sweep_phase(results: list[ModelResult], directory: Path, args: Any) -> None:
    """Each model's chosen variant under every SWEEP setting, interleaved."""
    for _ in range(args.repeats):
        for model, pick in ((m, m.chosen) for m in results):
            if pick is None:
                continue
            for name, overrides, env in SWEEP:
                measured = end_to_end(model.model, pick.variant, directory, overrides, env)
                rate = 0.0 if isinstance(measured, str) else measured[0]
                model.sweep.setdefault(name, []).append(rate)
                log(f"{model.model} {pick.variant} with {name}: {rate:.1f} images/s")


# ---------------------------------------------------------------- report


def targets(model: ModelResult, preprocess_only: float) -> list[tuple[str, bool]]:
    """The targets for the model's chosen variant, with whether this run met them."""
    pick, goal = model.chosen, TARGET_SPEEDUP[model.model]
    if pick is None:
        return [(f"{model.model}: a variant with top-1 agreement >= {TARGET_AGREEMENT:.0%}",
                 False)]
    e2e, slower = pick.best("end_to_end"), min(pick.best("model_only"), preprocess_only)
    speedup, share = e2e / max(model.baseline), e2e / slower
    ceiling = pick.shared_cpu_bound(preprocess_only) / slower
    name = f"{model.model} `{pick.variant}`"
    return [
        (f"{name} end to end >= {goal:g} x (b): {speedup:.2f}x", speedup >= goal),
        (f"{name} top-1 agreement with eager fp32 >= {TARGET_AGREEMENT:.0%}: "
         f"{pick.top1:.2%} ({pick.agreement_images} images)", pick.top1 >= TARGET_AGREEMENT),
        (f"{name} end to end >= {TARGET_END_TO_END:g} x min(model only, preprocessing only): "
         f"{share:.2f} (the shared-CPU bound is {ceiling:.2f} x that)",
         share >= TARGET_END_TO_END)]


def variants_table(model: ModelResult, pre: float) -> list[str]:
    """One row per variant, the baseline first, as Markdown lines."""
    base = max(model.baseline)
    lines = [f"`{model.model}`, images per second (higher is better):", "",
             "| variant | top-1 agreement | max score drift | model only (batch 32) | "
             "end to end | end to end / (b) | end to end / model only | shared-CPU bound | "
             "end to end / bound | setup s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| (b) baseline (DataLoader + eager torch) | | | | {base:.1f} | 1.00 | | | | |"]
    for r in model.variants:
        if r.failed and not r.end_to_end:
            lines.append(f"| {r.variant} | {r.failed} | | | | | | | | |")
            continue
        held = f", {r.agreement_images} held out" if r.held_out else ""
        e2e, alone, bound = r.best("end_to_end"), r.best("model_only"), r.shared_cpu_bound(pre)
        lines.append(f"| {r.variant} | {r.top1:.2%}{held} | {r.max_score_drift:.3g} | "
                     f"{alone:.1f} | {e2e:.1f} | {e2e / base:.2f} | {e2e / alone:.2f} | "
                     f"{bound:.1f} | {e2e / bound:.2f} | {min(r.setup_s):.1f} |")
    pick = model.chosen
    return [*lines, "", f"Chosen variant (fastest model only with top-1 agreement >= "
            f"{TARGET_AGREEMENT:.0%}, as `imgpipe optimize` picks): "
            f"{f'`{pick.variant}`' if pick else 'none'}.", ""]


def sweep_table(results: list[ModelResult]) -> list[str]:
    swept = [(m, m.chosen) for m in results if m.sweep and m.chosen]
    if not swept:
        return []
    lines = ["", "The chosen variant end to end under alternative settings (images/s, ratio "
             "to the defaults):", "",
             "| setting | " + " | ".join(f"{m.model} `{c.variant}`" for m, c in swept) + " |",
             "|---|" + "---:|" * len(swept),
             "| defaults | " + " | ".join(f"{c.best('end_to_end'):.1f}" for _, c in swept) + " |"]
    for name, _, _ in SWEEP:
        cells = [f"{max(m.sweep[name]):.1f} ({max(m.sweep[name]) / c.best('end_to_end'):.2f}x)"
                 for m, c in swept]
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return lines


def report(info: dict[str, Any]) -> str:
    """Everything measured, as the Markdown block that goes into the README."""
    data, pre = info["dataset"], max(info["preprocess_only"])
    lines = [f"{harness.measured_on(info, 'onnxruntime ' + info['onnxruntime'])} Cache off. "
             f"Dataset: {data['files']} JPEGs, {data['bytes'] / 1e6:.0f} MB "
             f"({harness.size_mix(data['sizes'])}). Best of {info['options']['repeats']} "
             f"runs (preprocessing only, (b) and end to end interleaved); model only "
             f"{info['options']['model_seconds']:g} s per variant; whole benchmark "
             f"{info['total_s'] / 60:.1f} min.", ""]
    for model in info["models"]:
        lines += variants_table(model, pre)
    lines += ["Top-1 agreement and max score drift (largest difference of any softmax "
              "probability) are against eager fp32 torch over every image; int8 over the images "
              "after the first 128, which it was calibrated on (held out; over all of them when "
              "there are no others). Preprocessing only (imgpipe's pool, one worker per core, "
              f"no model): {pre:.1f} images/s; shared-CPU bound: "
              "`1 / (1/model only + 1/preprocessing only)`. Setup s: Engine.setup() in the "
              "fresh process, artifacts already built.", "",
              *harness.target_lines([check for m in info["models"]
                                     for check in targets(m, pre)]),
              *sweep_table(info["models"])]
    return "\n".join(lines)


def raw_results(info: dict[str, Any]) -> dict[str, Any]:
    """Everything measured, every run included, for benchmarks/results/optimize-*.json."""
    pre = max(info["preprocess_only"])
    return {**info, "models": [
        {**asdict(m), "chosen": m.chosen.variant if m.chosen else None,
         "targets": dict(targets(m, pre))} for m in info["models"]]}


def main(argv: Optional[list[str]] = None) -> int:
    args = parse_args(argv)
    started = time.perf_counter()
    directory = datasets.first_images(args.images)
    log(f"dataset: {directory}")
    import onnxruntime

    info = harness.run_header(directory, args, onnxruntime=onnxruntime.__version__)
    info["models"] = [model_phase(model, directory, args) for model in args.models]
    info["preprocess_only"] = score_phase(info["models"], directory, args)
    if args.sweep:
        sweep_phase(info["models"], directory, args)
    return harness.finish("optimize", args, info, started, report, "optimize", raw_results)


if __name__ == "__main__":
    sys.exit(main())
