"""`imgpipe score` with each inference variant, against the DataLoader baseline.

One run, EfficientNet-Lite0 on the mixed-size directory, measures:

  (b) the baseline: bench_score's DataLoader + eager torch loop;
  preprocessing only: bench_score's (d), imgpipe's pool without a model;

and for each inference variant (backend:precision):

  model only: the variant's backend on batches of 32 real preprocessed images;
  agreement:  top-1 agreement and the largest softmax drift against eager fp32
              over the directory's images (int8: over those it was not
              calibrated on, as `imgpipe optimize` judges it);
  end to end: bench_score's (a) with the variant: Engine.run over the
              directory in a fresh process with the command's environment;

then end to end for the chosen variant (the fastest model only among those
that agree, as `imgpipe optimize` picks) under model.threads x
preprocess.workers settings. The machine is noisy, so only ratios within one
run mean anything; each rate is the best of --repeats runs ((b),
preprocessing only and end to end interleaved). The result cache is off;
built artifacts (ONNX, int8, TorchScript) are kept under benchmarks/data/ and
built before any timing.

    .venv/bin/python -m benchmarks.bench_optimize [--images N] [--variants ...] [--quick]

Writes the table into benchmarks/README.md between the optimize markers and
the raw numbers to benchmarks/results/optimize-*.json.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

from benchmarks import datasets, harness
from benchmarks.bench_score import (
    BATCH,
    imgpipe_settings,
    measure_baseline,
    measure_pool,
    measure_variant,
)
from benchmarks.bench_score import Variant as Overrides
from benchmarks.harness import CORES, log
from pipeline.errors import ConfigError
from pipeline.variants import Variant

if TYPE_CHECKING:
    import numpy as np

    from pipeline.backends import TorchBackend
    from pipeline.config import Settings
    from pipeline.models import LoadedModel

MODEL = "efficientnet_lite0"
DEFAULT_VARIANTS = ("torch", "torchscript", "torch:bf16", "onnxruntime", "onnxruntime:int8")
# model.threads x preprocess.workers: 0 (the default) = one per core, 1, and half the cores.
THREAD_GRID = tuple(sorted({0, 1, max(1, CORES // 2)}))
CACHE_DIR = datasets.DATA / "optimize-cache"  # artifacts survive between runs
TARGET_SPEEDUP, TARGET_AGREEMENT, TARGET_END_TO_END = 5.0, 0.99, 0.85
# The baseline runs under the user's own thread policy, as their script would.
USER_OMP_WAIT_POLICY = os.environ.get("OMP_WAIT_POLICY")
# What the imgpipe command sets for itself before torch loads (workers/cli.py):
# model only runs with it, like the end-to-end runs it is compared with. Nothing
# imported above loads torch.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")


@dataclass
class Options:
    """What to run, from the command line."""

    images: int
    variants: list[str]
    repeats: int
    model_seconds: float
    thread_study: bool
    write_readme: bool
    quick: bool


@dataclass
class VariantResult:
    """One variant: its agreement with eager fp32 and every run in images/s."""

    variant: str
    top1: float = 0.0
    max_score_drift: float = 0.0
    agreement_images: int = 0
    held_out: bool = False  # agreement measured on images int8 was not calibrated on
    build_s: float = 0.0  # backend setup in this run, first export or quantization included
    model_only: list[float] = field(default_factory=list)
    end_to_end: list[float] = field(default_factory=list)
    setup_s: list[float] = field(default_factory=list)  # Engine.setup() in the fresh process
    failed: str = ""

    @property
    def accepted(self) -> bool:
        return not self.failed and self.top1 >= TARGET_AGREEMENT

    @property
    def best_model_only(self) -> float:
        return max(self.model_only, default=0.0)

    @property
    def best_end_to_end(self) -> float:
        return max(self.end_to_end, default=0.0)

    def shared_cpu_bound(self, preprocess_only: float) -> float:
        """End to end if model and preprocessing take turns on the same cores at full
        speed (bench_score's bound): the best a CPU-only machine allows."""
        return 1.0 / (1.0 / self.best_model_only + 1.0 / preprocess_only)


@dataclass
class ThreadRun:
    """End to end of the chosen variant under one thread setting (0 = one per core)."""

    threads: int
    workers: int
    runs: list[float] = field(default_factory=list)
    failed: str = ""

    @property
    def best(self) -> float:
        return max(self.runs, default=0.0)

    @property
    def busy(self) -> int:
        """Inference threads plus preprocessing processes that want a core."""
        return (self.threads or CORES) + (self.workers or CORES)


# ---------------------------------------------------------------- command line


def parse_args(argv: Optional[list[str]] = None) -> Options:
    """Command-line options; --quick shrinks everything to a smoke run."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--images", type=int, default=400,
                        help="images in the generated directory (default 400)")
    parser.add_argument("--variants", nargs="+", default=list(DEFAULT_VARIANTS),
                        help="backend[:precision] to measure (default: %(default)s; "
                             "torch-compile also runs, after a compile of minutes)")
    parser.add_argument("--repeats", type=int, default=2,
                        help="interleaved runs of each measurement; the best counts")
    parser.add_argument("--model-seconds", type=float, default=10.0,
                        help="how long model only runs per variant, over all repeats")
    parser.add_argument("--no-threads", dest="thread_study", action="store_false",
                        help="skip the thread settings study")
    parser.add_argument("--no-readme", dest="write_readme", action="store_false",
                        help="do not update benchmarks/README.md")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 100 images, one repeat, README untouched")
    args = parser.parse_args(argv)
    try:
        variants = [str(Variant.parse(text)) for text in args.variants]
    except ConfigError as exc:
        parser.error(str(exc))
    if args.quick:
        args.images, args.repeats, args.model_seconds = 100, 1, 3.0
    return Options(args.images, variants, max(1, args.repeats), args.model_seconds,
                   args.thread_study, args.write_readme and not args.quick, args.quick)


# ---------------------------------------------------------------- model only, agreement


def model_settings() -> Settings:
    """bench_score's settings for the model, with artifacts kept across runs."""
    return imgpipe_settings(MODEL, {"cache.dir": str(CACHE_DIR)})


def validation_samples(directory: Path, settings: Settings) -> dict[str, np.ndarray]:
    """{path: uint8 CHW} for every image, in path order, preprocessed as in production."""
    from pipeline.backends.calibration import first_files, preprocessed

    pre = settings.preprocess
    files = first_files(directory, len(datasets.list_images(directory)))
    return preprocessed(files, pre.spec(), pre.limits())


def measure_model(variant: Variant, settings: Settings, model: LoadedModel,
                  reference: TorchBackend, directory: Path, samples: dict[str, np.ndarray],
                  options: Options) -> VariantResult:
    """Build the variant's backend (its artifact too, if missing), then agreement and
    model only; a variant that cannot run here is recorded with the reason."""
    from pipeline.backends import backend_for
    from pipeline.backends.validation import agreement
    from pipeline.errors import ImgpipeError, first_line
    from pipeline.optimize import judged_on

    result = VariantResult(str(variant))
    started = time.perf_counter()
    try:
        backend = backend_for(settings, model, reference.device, variant, directory, BATCH)
        backend.setup()
    except (ImgpipeError, RuntimeError, ImportError) as exc:
        result.failed = f"cannot run here: {first_line(exc)}"
        return result
    result.build_s = time.perf_counter() - started
    try:
        scored = judged_on(variant, directory, samples)
        result.held_out = len(scored) < len(samples)
        found = agreement(reference, backend, scored)
        result.top1, result.max_score_drift = found.top1, found.max_score_drift
        result.agreement_images = found.images
        every = list(samples.values())
        batch = [every[i % len(every)] for i in range(BATCH)]
        seconds = options.model_seconds / options.repeats
        for _ in range(options.repeats):
            result.model_only.append(
                harness.images_per_s(lambda: backend.predict(batch), BATCH, seconds))
    finally:
        backend.close()
    return result


def model_phase(directory: Path, options: Options) -> list[VariantResult]:
    """Every variant's agreement and model only, against one eager fp32 reference."""
    import torch

    from pipeline.backends import TorchBackend
    from pipeline.models import load_model

    settings = model_settings()
    samples = validation_samples(directory, settings)
    model = load_model(settings.model.name, settings.model.weights, settings.model.labels)
    reference = TorchBackend(model, torch.device("cpu"), BATCH,
                             settings.preprocess.spec().output_shape, settings.model.threads)
    reference.setup()
    results = []
    for text in options.variants:
        log(f"{text}: build, agreement over {len(samples)} images, model only "
            f"{options.model_seconds:g} s")
        result = measure_model(Variant.parse(text), settings, model, reference, directory,
                               samples, options)
        measured = f"top-1 {result.top1:.2%}, model only {result.best_model_only:.1f} images/s"
        log(f"{text}: {result.failed or measured}")
        results.append(result)
    reference.close()
    return results


def chosen(results: list[VariantResult]) -> Optional[VariantResult]:
    """What `imgpipe optimize` picks: the fastest model only among accepted variants."""
    return max((r for r in results if r.accepted), key=lambda r: r.best_model_only,
               default=None)


# ---------------------------------------------------------------- end to end


def score_overrides(variant: Variant, directory: Path) -> dict[str, Any]:
    """`imgpipe score` with this variant; int8 calibrates on the scored directory."""
    return {"model.backend": variant.backend, "model.precision": variant.precision,
            "model.calibration_images": str(directory), "cache.enabled": False,
            "cache.dir": str(CACHE_DIR)}


def end_to_end(name: str, directory: Path,
               overrides: dict[str, Any]) -> tuple[float, float] | str:
    """bench_score's (a) in a fresh process: (images/s, setup s), or why it failed."""
    try:
        return measure_variant(MODEL, directory, Overrides(name, overrides))
    except subprocess.CalledProcessError as exc:
        lines = (exc.stderr or "").strip().splitlines() or [f"exit status {exc.returncode}"]
        return f"end to end failed: {lines[-1]}"


def baseline_env() -> dict[str, str]:
    """This environment with the user's own OpenMP wait policy (none: OpenMP's default)."""
    env = {key: value for key, value in os.environ.items() if key != "OMP_WAIT_POLICY"}
    if USER_OMP_WAIT_POLICY is not None:
        env["OMP_WAIT_POLICY"] = USER_OMP_WAIT_POLICY
    return env


def baseline(directory: Path) -> float:
    """(b) in a fresh process: torch reads the wait policy once, when it loads."""
    measured = harness.in_fresh_process("benchmarks.bench_optimize", "--baseline",
                                        str(directory), env=baseline_env())
    return float(measured["images_per_s"])


def score_phase(results: list[VariantResult], directory: Path,
                options: Options) -> dict[str, list[float]]:
    """(b), preprocessing alone and every runnable variant end to end, interleaved;
    the runs of (b) and of preprocessing alone."""
    runs: dict[str, list[float]] = {"baseline": [], "preprocess_only": []}
    for attempt in range(options.repeats):
        log(f"(b) DataLoader baseline, preprocessing only and end to end, "
            f"run {attempt + 1}/{options.repeats}")
        runs["baseline"].append(baseline(directory))
        runs["preprocess_only"].append(measure_pool(directory))
        log(f"(b) baseline: {runs['baseline'][-1]:.1f} images/s, preprocessing only: "
            f"{runs['preprocess_only'][-1]:.1f} images/s")
        for result in (r for r in results if not r.failed):
            variant = Variant.parse(result.variant)
            measured = end_to_end(result.variant, directory, score_overrides(variant, directory))
            if isinstance(measured, str):
                result.failed = measured
                log(f"{result.variant}: {measured}")
                continue
            result.end_to_end.append(measured[0])
            result.setup_s.append(measured[1])
            log(f"{result.variant} end to end: {measured[0]:.1f} images/s")
    return runs


def thread_phase(result: VariantResult, directory: Path, options: Options) -> list[ThreadRun]:
    """The chosen variant end to end under each model.threads x preprocess.workers."""
    grid = [ThreadRun(threads, workers) for threads in THREAD_GRID for workers in THREAD_GRID]
    base = score_overrides(Variant.parse(result.variant), directory)
    for _ in range(options.repeats):
        for run in grid:
            name = f"threads={run.threads}, workers={run.workers}"
            measured = end_to_end(name, directory, {**base, "model.threads": run.threads,
                                                    "preprocess.workers": run.workers})
            if isinstance(measured, str):
                run.failed = measured
                log(f"{result.variant} with {name}: {measured}")
                continue
            run.runs.append(measured[0])
            log(f"{result.variant} with {name}: {measured[0]:.1f} images/s")
    return grid


# ---------------------------------------------------------------- report


def targets(info: dict[str, Any], results: list[VariantResult]) -> list[tuple[str, bool]]:
    """The issue's targets for the chosen variant, with whether this run met them."""
    pick = chosen(results)
    if pick is None:
        return [(f"a variant with top-1 agreement >= {TARGET_AGREEMENT:.0%}", False)]
    speedup = pick.best_end_to_end / info["baseline"]
    share = pick.best_end_to_end / pick.best_model_only
    ceiling = pick.shared_cpu_bound(info["preprocess_only"]) / pick.best_model_only
    return [
        (f"`{pick.variant}` end to end >= {TARGET_SPEEDUP:g} x (b): {speedup:.2f}x",
         speedup >= TARGET_SPEEDUP),
        (f"`{pick.variant}` top-1 agreement with eager fp32 >= {TARGET_AGREEMENT:.0%}: "
         f"{pick.top1:.2%} ({pick.agreement_images} images)", pick.top1 >= TARGET_AGREEMENT),
        (f"`{pick.variant}` end to end >= {TARGET_END_TO_END:g} x its model only: {share:.2f} "
         f"(the shared-CPU bound is {ceiling:.2f} x model only)", share >= TARGET_END_TO_END)]


def variants_table(info: dict[str, Any], results: list[VariantResult]) -> list[str]:
    """One row per variant, the baseline first, as Markdown lines."""
    base, pre = info["baseline"], info["preprocess_only"]
    lines = ["| variant | top-1 agreement | max score drift | model only (batch 32) | "
             "end to end | end to end / (b) | end to end / model only | shared-CPU bound | "
             "end to end / bound | setup s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
             f"| (b) DataLoader + eager torch | | | | {base:.1f} | 1.00 | | | | |"]
    for r in results:
        if r.failed and not r.end_to_end:
            lines.append(f"| {r.variant} | {r.failed} | | | | | | | | |")
            continue
        held = f", {r.agreement_images} held out" if r.held_out else ""
        e2e, bound = r.best_end_to_end, r.shared_cpu_bound(pre)
        lines.append(f"| {r.variant} | {r.top1:.2%}{held} | {r.max_score_drift:.3g} | "
                     f"{r.best_model_only:.1f} | {e2e:.1f} | {e2e / base:.2f} | "
                     f"{e2e / r.best_model_only:.2f} | {bound:.1f} | {e2e / bound:.2f} | "
                     f"{min(r.setup_s):.1f} |")
    return lines


def thread_lines(pick: VariantResult, grid: list[ThreadRun]) -> list[str]:
    """The thread study as a Markdown table plus what it says."""
    defaults = next((r.best for r in grid if r.threads == r.workers == 0), 0.0)
    lines = [f"`{pick.variant}` end to end under each thread setting (images/s, best of the "
             f"interleaved runs; 0 = one per core; busy = inference threads + preprocessing "
             f"processes, on {CORES} cores):", "",
             "| model.threads | preprocess.workers | busy | images/s | vs defaults |",
             "|---:|---:|---:|---:|---:|"]
    for r in grid:
        measured = f"{r.failed} | |" if r.failed else (
            f"{r.best:.1f} | {r.best / defaults:.2f}" if defaults else f"{r.best:.1f} | |")
        lines.append(f"| {r.threads} | {r.workers} | {r.busy} | {measured} |")
    measured_runs = [r for r in grid if r.runs]
    if not measured_runs or not defaults:
        return lines
    fastest = max(measured_runs, key=lambda r: r.best)
    lines += ["", f"Fastest setting: model.threads={fastest.threads}, preprocess.workers="
              f"{fastest.workers} ({fastest.best:.1f} images/s); the defaults reach "
              f"{defaults / fastest.best:.2f} of it."]
    fits = [r.best for r in measured_runs if r.busy <= CORES]
    over = [r.best for r in measured_runs if r.busy > CORES]
    if fits and over:
        lines.append(f"Oversubscribed (busy > {CORES} cores): best {max(over):.1f} images/s, "
                     f"against {max(fits):.1f} for the best setting that fits "
                     f"({max(over) / max(fits):.2f}x).")
    return lines


def report(info: dict[str, Any], results: list[VariantResult],
           grid: Optional[list[ThreadRun]]) -> str:
    """Everything measured, as the Markdown block that goes into the README."""
    m, data = info["machine"], info["dataset"]
    pick = chosen(results)
    lines = [f"{harness.measured_on(info['date'], m)}onnxruntime {m['onnxruntime']}, "
             f"{m['pillow']} {m['pil_version']}; 1-minute load "
             f"average {m['load_average'][0]:.2f} at the start, "
             f"{info['load_average_end'][0]:.2f} at the end. Model `{MODEL}`, cache off. "
             f"Dataset: {data['files']} JPEGs, {data['bytes'] / 1e6:.0f} MB "
             f"({harness.size_mix(data['sizes'])}). Best of {info['options']['repeats']} "
             f"runs ((b), preprocessing only and end to end interleaved); model only "
             f"{info['options']['model_seconds']:g} s per variant; whole benchmark "
             f"{info['total_s'] / 60:.1f} min.",
             "", "Images per second (higher is better):", "", *variants_table(info, results),
             "", "Top-1 agreement and max score drift (largest difference of any softmax "
             "probability) are against eager fp32 torch over every image; int8 over the images "
             "after the first 128, which it was calibrated on (held out; over all of them when "
             "there are no others). Preprocessing only (imgpipe's pool, one worker per core, "
             f"no model): {info['preprocess_only']:.1f} images/s; shared-CPU bound: "
             "`1 / (1/model only + 1/preprocessing only)`. Setup s: Engine.setup() in the "
             "fresh process, artifacts already built.", ""]
    lines.append(f"Chosen variant (fastest model only with top-1 agreement >= "
                 f"{TARGET_AGREEMENT:.0%}, as `imgpipe optimize` picks): "
                 f"{f'`{pick.variant}`' if pick else 'none'}.")
    lines += ["", "Targets:", ""]
    lines += harness.target_lines(targets(info, results))
    if pick is not None and grid:
        lines += ["", *thread_lines(pick, grid)]
    return "\n".join(lines)


def raw_results(info: dict[str, Any], results: list[VariantResult],
                grid: Optional[list[ThreadRun]]) -> dict[str, Any]:
    """Everything measured, every run included, for benchmarks/results/optimize-*.json."""
    return {**info, "variants": [{**asdict(r), "accepted": r.accepted} for r in results],
            "chosen": (chosen(results) or VariantResult("none")).variant,
            "threads": [asdict(run) for run in grid or []],
            "targets": dict(targets(info, results))}


# ---------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--baseline"]:
        print(json.dumps({"images_per_s": measure_baseline(MODEL, Path(argv[1]))}))
        return 0
    options = parse_args(argv)
    started = time.perf_counter()
    directory = datasets.ensure_dataset(options.images)
    log(f"dataset: {directory}")
    import onnxruntime

    info = harness.run_header(directory, options)
    info["machine"]["onnxruntime"] = onnxruntime.__version__
    results = model_phase(directory, options)
    info["runs"] = score_phase(results, directory, options)
    info["baseline"] = max(info["runs"]["baseline"])
    info["preprocess_only"] = max(info["runs"]["preprocess_only"])
    pick = chosen(results)
    grid = thread_phase(pick, directory, options) if options.thread_study and pick else None
    info["load_average_end"] = os.getloadavg()
    info["total_s"] = time.perf_counter() - started
    block = report(info, results, grid)
    print(block)
    raw = harness.save_json("optimize", raw_results(info, results, grid), options.quick)
    print(f"\nraw results: {raw}")
    if options.write_readme:
        harness.update_readme("optimize", block, "## Inference variants (`bench_optimize.py`)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
