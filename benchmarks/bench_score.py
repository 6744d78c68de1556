"""Side-by-side throughput of `imgpipe score` against what it is built from.

One run measures, for each model, on the same machine and the same files:

  (a) imgpipe: Engine.setup() (timed separately), then Engine.run() over the
      directory with a sink that only counts records;
  (b) the baseline a user would write: a torch DataLoader (one worker per
      core) over PIL + torchvision transforms, and an eager model loop;
  (c) the model alone on pre-made uint8 batches (TorchBackend, batch 32);
  (d) preprocessing alone: imgpipe's PreprocessPool over the directory;

plus single-process preprocessing per backend (pillow, dali), one run of the
real CLI, and (a) again under alternative settings. The machine is noisy, so
only ratios within one run mean anything; each number is the best of
--repeats interleaved runs. The cache, where the engine has one, is off.

    .venv/bin/python -m benchmarks.bench_score [--images N] [--models ...] [--quick]
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional, cast

# Only light imports up here: spawned worker processes re-import this module.
import numpy as np
from PIL import Image

from benchmarks import datasets, harness
from benchmarks.harness import CORES, log
from pipeline.preprocess.select import create_backend, dali_available
from pipeline.spec import InputLimits, PreprocessSpec

if TYPE_CHECKING:
    from pipeline.config import Settings
    from pipeline.predictions import Record
    from pipeline.preprocess.pool import PreprocessPool

MODELS = ("efficientnet_lite0", "mobilenet_v3_small")
SLOW_MODELS = {"efficientnet_lite0"}  # (a) and (b) run on a subset for these
BATCH = 32
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Variant:
    """(a) under other settings overrides and/or environment variables."""

    name: str
    overrides: dict[str, Any] = field(default_factory=dict)
    env: dict[str, str] = field(default_factory=dict)  # set: runs in a fresh process


# The environment `imgpipe` sets for itself before torch loads (workers/cli.py);
# (a) always runs in a fresh process with it, as the command does.
IMGPIPE_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}
SWEEP = (
    Variant("model.threads=1", {"model.threads": 1}),
    Variant("preprocess.workers=1", {"preprocess.workers": 1}),
    Variant("model.threads=1, preprocess.chunk_size=32",
            {"model.threads": 1, "preprocess.chunk_size": 32}),
    Variant("env OMP_WAIT_POLICY=ACTIVE (spinning threads)", env={"OMP_WAIT_POLICY": "ACTIVE"}),
)


@dataclass
class Options:
    """What to run, from the command line."""

    images: int
    subset: int
    models: list[str]
    repeats: int
    model_seconds: float
    single_process_images: int
    sweep: bool
    cli: bool
    write_readme: bool
    quick: bool


@dataclass
class ModelResult:
    """Every run measured for one model, in images/s; the best run counts."""

    model: str
    images: int  # files scored in (a) and (b)
    preprocess_only: float  # (d), shared by every model
    runs: dict[str, list[float]] = field(default_factory=dict)  # (a), (b), (c)
    setup_s: list[float] = field(default_factory=list)
    sweep: dict[str, list[float]] = field(default_factory=dict)

    def best(self, key: str) -> float:
        return max(self.runs[key])

    @property
    def imgpipe(self) -> float:
        return self.best("imgpipe")

    @property
    def baseline(self) -> float:
        return self.best("baseline")

    @property
    def model_only(self) -> float:
        return self.best("model_only")

    @property
    def shared_cpu_bound(self) -> float:
        """Throughput if (c) and (d) take turns on the same cores at full speed."""
        return 1.0 / (1.0 / self.model_only + 1.0 / self.preprocess_only)

    @property
    def vs_baseline(self) -> float:
        return self.imgpipe / self.baseline

    @property
    def vs_bound(self) -> float:
        return self.imgpipe / min(self.model_only, self.preprocess_only)

    def summary(self) -> dict[str, Any]:
        return {"imgpipe": self.imgpipe, "baseline": self.baseline,
                "model_only": self.model_only, "preprocess_only": self.preprocess_only,
                "a_over_b": self.vs_baseline, "a_over_min_c_d": self.vs_bound,
                "shared_cpu_bound": self.shared_cpu_bound,
                "sweep_best": {name: max(runs) for name, runs in self.sweep.items()}}


# ---------------------------------------------------------------- command line


def parse_args(argv: Optional[list[str]] = None) -> Options:
    """Command-line options; --quick shrinks everything to a smoke run."""
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--images", type=int, default=1000,
                        help="images in the generated directory (default 1000)")
    parser.add_argument("--subset", type=int, default=400,
                        help=f"images for (a) and (b) with {', '.join(sorted(SLOW_MODELS))}")
    parser.add_argument("--models", nargs="+", choices=MODELS, default=list(MODELS))
    parser.add_argument("--repeats", type=int, default=2,
                        help="interleaved runs of each measurement; the best counts")
    parser.add_argument("--model-seconds", type=float, default=10.0,
                        help="how long (c) runs per model, over all repeats")
    parser.add_argument("--no-sweep", dest="sweep", action="store_false",
                        help="skip (a) under alternative settings")
    parser.add_argument("--no-cli", dest="cli", action="store_false",
                        help="skip the reference run of the imgpipe CLI")
    parser.add_argument("--no-readme", dest="write_readme", action="store_false",
                        help="do not update benchmarks/README.md")
    parser.add_argument("--quick", action="store_true",
                        help="smoke run: 100 images, one repeat, README untouched")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.subset, args.repeats, args.model_seconds = 100, 100, 1, 3.0
    return Options(args.images, min(args.subset, args.images), args.models,
                   max(1, args.repeats), args.model_seconds, min(200, args.images),
                   args.sweep, args.cli, args.write_readme and not args.quick, args.quick)


# ---------------------------------------------------------------- (a) imgpipe


class CountingSink:
    """Discards records and counts them."""

    def __init__(self) -> None:
        self.records = 0

    def __call__(self, records: list[Record]) -> None:
        self.records += len(records)


def imgpipe_settings(model: str, extra: Optional[dict[str, Any]] = None) -> Settings:
    """The default configuration for `model` on the CPU, cache off (or re-runs would
    be hits), plus `extra` overrides."""
    from pipeline.config import load_settings

    weights = datasets.weights_for(model)
    overrides: dict[str, Any] = {"model.name": model, "model.device": "cpu",
                                 "model.weights": str(weights) if weights else None,
                                 "cache.enabled": False}
    return load_settings(overrides={**overrides, **(extra or {})})


def measure_imgpipe(model: str, directory: Path,
                    extra: Optional[dict[str, Any]] = None) -> tuple[float, float]:
    """(a): images/s of Engine.run() over `directory`, and the setup seconds."""
    from pipeline.engine import Engine
    from pipeline.sources import directory as directory_source

    engine = Engine(imgpipe_settings(model, extra))
    try:
        started = time.perf_counter()
        engine.setup()
        setup_s = time.perf_counter() - started
        sink = CountingSink()
        summary = engine.run(directory_source.walk(str(directory)), sink)
    finally:
        engine.close()
    expected = len(datasets.list_images(directory))
    if sink.records != expected or summary.scored != expected:
        raise RuntimeError(f"imgpipe scored {summary.scored} of {expected} files "
                           f"({sink.records} records; errors {dict(summary.errors)})")
    return summary.images_per_s, setup_s


def measure_variant(model: str, directory: Path, variant: Variant) -> tuple[float, float]:
    """(a) under a variant, in a fresh process with imgpipe's environment:
    images/s and setup seconds."""
    request = json.dumps({"model": model, "directory": str(directory),
                          "overrides": variant.overrides})
    measured = harness.in_fresh_process("benchmarks.bench_score", "--child", request,
                                        env={**os.environ, **IMGPIPE_ENV, **variant.env})
    return float(measured["images_per_s"]), float(measured["setup_s"])


def child(request: str) -> int:
    """The --child entry point: one (a) measurement, printed as JSON."""
    spec = json.loads(request)
    rate, setup_s = measure_imgpipe(spec["model"], Path(spec["directory"]), spec["overrides"])
    print(json.dumps({"images_per_s": rate, "setup_s": setup_s}))
    return 0


def measure_cli(model: str, directory: Path) -> dict[str, Any]:
    """The real `imgpipe score DIR --out FILE`, wall time including start-up."""
    weights = datasets.weights_for(model)
    command = [str(Path(sys.executable).parent / "imgpipe"), "score", str(directory),
               "--model", model, "--device", "cpu"]
    command += ["--weights", str(weights)] if weights else []
    env = {**os.environ, "IMGPIPE_CACHE__ENABLED": "false"}
    with tempfile.TemporaryDirectory() as scratch:
        out = Path(scratch) / "results.jsonl"
        started = time.perf_counter()
        done = subprocess.run([*command, "--out", str(out)], capture_output=True, text=True,
                              check=True, env=env)
        wall_s = time.perf_counter() - started
        lines = sum(1 for line in out.read_text(encoding="utf-8").splitlines()
                    if not line.startswith('{"imgpipe_results"'))  # the settings header
    reported = re.search(r"([\d.]+) images/s", done.stderr)
    return {"model": model, "images": lines, "wall_s": wall_s,
            "images_per_s_wall": lines / wall_s,
            "images_per_s_reported": float(reported[1]) if reported else None}


# ---------------------------------------------------------------- (b) baseline


class PhotoFiles:
    """A map-style dataset: files opened with PIL and run through `transform`."""

    def __init__(self, files: list[Path], transform: Callable[[Image.Image], Any]) -> None:
        self.files = files
        self.transform = transform

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, index: int) -> Any:
        with Image.open(self.files[index]) as image:
            return self.transform(image.convert("RGB"))


def baseline_transform() -> Callable[[Image.Image], Any]:
    """The torchvision recipe every ImageNet example uses."""
    from torchvision import transforms

    return transforms.Compose([
        transforms.Resize(256), transforms.CenterCrop(224), transforms.ToTensor(),
        transforms.Normalize(IMAGENET_MEAN, IMAGENET_STD)])


def measure_baseline(model: str, directory: Path) -> float:
    """(b): images/s from creating the DataLoader iterator to the last batch."""
    import torch
    from torch.utils.data import DataLoader, Dataset

    from pipeline.models import load_model

    module = load_model(model, datasets.weights_for(model)).module.eval()
    torch.set_num_threads(CORES)
    # PhotoFiles is a map-style dataset without subclassing (torch stays out of workers).
    files = datasets.list_images(directory)
    dataset = cast("Dataset[Any]", PhotoFiles(files, baseline_transform()))
    loader: DataLoader[Any] = DataLoader(dataset, batch_size=BATCH, num_workers=CORES)
    seen = 0
    started = time.perf_counter()
    with torch.no_grad():
        for batch in loader:
            module(batch).softmax(dim=1).topk(5)
            seen += len(batch)
    return seen / (time.perf_counter() - started)


# ---------------------------------------------------------------- (c) model only


def measure_model_only(model: str, seconds: float) -> float:
    """(c): images/s of TorchBackend.predict on pre-made uint8 batches of 32."""
    import torch

    from pipeline.backends import TorchBackend
    from pipeline.models import load_model

    spec = PreprocessSpec()
    backend = TorchBackend(load_model(model, datasets.weights_for(model)), torch.device("cpu"),
                           BATCH, spec.output_shape, threads=CORES)
    backend.setup()
    rng = np.random.default_rng(0)
    batch = [rng.integers(0, 256, spec.output_shape, dtype=np.uint8) for _ in range(BATCH)]
    rate = harness.images_per_s(lambda: backend.predict(batch), BATCH, seconds)
    backend.close()
    return rate


# ---------------------------------------------------------------- (d) preprocessing


def make_pool(workers: int) -> PreprocessPool:
    """imgpipe's preprocessing pool with the default settings, pillow, no cache."""
    from pipeline.config import load_settings
    from pipeline.preprocess.pool import PreprocessPool, WorkerPlan

    pre = load_settings(overrides={"model.device": "cpu"}).preprocess
    return PreprocessPool(WorkerPlan("pillow", pre.spec(), pre.limits()), workers,
                          pre.chunk_size)


def measure_pool(directory: Path) -> float:
    """(d): images/s of the PreprocessPool (one worker per core), no model."""
    from pipeline.sources import directory as directory_source

    pool = make_pool(CORES)
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


def measure_single_process(backends: list[str], files: list[Path]) -> dict[str, float]:
    """Images/s of each backend in one fresh (spawned) process, chunks of 8."""
    rates = {}
    context = multiprocessing.get_context("spawn")
    for name in backends:
        with ProcessPoolExecutor(1, mp_context=context) as executor:
            rates[name] = executor.submit(_backend_rate, name, [str(f) for f in files]).result()
    return rates


def _backend_rate(name: str, files: list[str], chunk: int = 8) -> float:
    """In a worker process: decode `files` (already read) with one backend."""
    payloads = [Path(f).read_bytes() for f in files]
    backend = create_backend(name, PreprocessSpec(), InputLimits())
    backend.setup()
    backend.run(payloads[:chunk])  # warm-up: pipeline build, first allocations
    started = time.perf_counter()
    for start in range(0, len(payloads), chunk):
        for outcome in backend.run(payloads[start:start + chunk]):
            if not isinstance(outcome, np.ndarray):
                raise RuntimeError(f"{name} failed: {outcome}")
    rate = len(payloads) / (time.perf_counter() - started)
    backend.close()
    return rate


def preprocessing(directory: Path, options: Options) -> dict[str, Any]:
    """(d), best of the repeats, and the single-process rate of each backend."""
    log(f"(d) preprocessing pool over {len(datasets.list_images(directory))} images")
    pool_runs = [measure_pool(directory) for _ in range(options.repeats)]
    backends = ["pillow"] + (["dali"] if dali_available() else [])
    files = datasets.spread(datasets.list_images(directory), options.single_process_images)
    log(f"single-process preprocessing, {len(files)} files: {', '.join(backends)}")
    return {"pool_runs": pool_runs, "pool": max(pool_runs), "single_process_files": len(files),
            "single_process": measure_single_process(backends, files)}


# ---------------------------------------------------------------- per model


def bench_model(model: str, directory: Path, preprocess_only: float,
                options: Options) -> ModelResult:
    """(c), then (a) and (b) interleaved, then the sweep, for one model."""
    if model in SLOW_MODELS:
        directory = datasets.ensure_subset(directory, options.subset)
    result = ModelResult(model, len(datasets.list_images(directory)), preprocess_only,
                         {"imgpipe": [], "baseline": [], "model_only": []})
    log(f"{model}: (c) model only, {options.model_seconds:.0f} s")
    for _ in range(options.repeats):
        result.runs["model_only"].append(
            measure_model_only(model, options.model_seconds / options.repeats))
    for attempt in range(options.repeats):
        log(f"{model}: (a) imgpipe and (b) DataLoader over {result.images} images, "
            f"run {attempt + 1}/{options.repeats}")
        rate, setup_s = measure_variant(model, directory, Variant("defaults"))
        result.runs["imgpipe"].append(rate)
        result.setup_s.append(setup_s)
        result.runs["baseline"].append(measure_baseline(model, directory))
    log(f"{model}: a={result.imgpipe:.1f} b={result.baseline:.1f} c={result.model_only:.1f} "
        f"d={preprocess_only:.1f} images/s")
    if options.sweep:
        sweep(result, directory, options.repeats)
    return result


def sweep(result: ModelResult, directory: Path, repeats: int) -> None:
    """(a) under every variant in SWEEP, interleaved, `repeats` times."""
    for _ in range(repeats):
        for variant in SWEEP:
            rate, _ = measure_variant(result.model, directory, variant)
            result.sweep.setdefault(variant.name, []).append(rate)
            log(f"{result.model}: (a) with {variant.name}: {rate:.1f} images/s")


# ---------------------------------------------------------------- report


def targets(results: list[ModelResult]) -> list[tuple[str, bool]]:
    """Each target with whether this run met it."""
    checks = []
    for r in results:
        if r.model == "mobilenet_v3_small":
            checks.append((f"{r.model}: (a) >= 2 x (b)", r.vs_baseline >= 2.0))
        checks.append((f"{r.model}: (a) >= 0.85 x min(c, d)", r.vs_bound >= 0.85))
        checks.append((f"{r.model}: (a) >= (b)", r.vs_baseline >= 1.0))
    return checks


def results_table(results: list[ModelResult]) -> list[str]:
    """The main table as Markdown lines."""
    lines = ["| model | images | (a) imgpipe | (b) DataLoader | (c) model only | "
             "(d) preprocessing only | a/b | a/min(c,d) | shared-CPU bound | a/bound | "
             "setup s |",
             "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for r in results:
        lines.append(f"| {r.model} | {r.images} | {r.imgpipe:.1f} | {r.baseline:.1f} | "
                     f"{r.model_only:.1f} | {r.preprocess_only:.1f} | {r.vs_baseline:.2f} | "
                     f"{r.vs_bound:.2f} | {r.shared_cpu_bound:.1f} | "
                     f"{r.imgpipe / r.shared_cpu_bound:.2f} | {min(r.setup_s):.1f} |")
    return lines


def sweep_table(results: list[ModelResult]) -> list[str]:
    """(a) under each variant, as Markdown lines (empty when not run)."""
    swept = [r for r in results if r.sweep]
    if not swept:
        return []
    lines = ["| variant of (a) | " + " | ".join(r.model for r in swept) + " |",
             "|---|" + "---:|" * len(swept),
             "| defaults | " + " | ".join(f"{r.imgpipe:.1f}" for r in swept) + " |"]
    for variant in SWEEP:
        cells = [f"{max(r.sweep[variant.name]):.1f} ({max(r.sweep[variant.name]) / r.imgpipe:.2f}x)"
                 for r in swept]
        lines.append(f"| {variant.name} | " + " | ".join(cells) + " |")
    return lines


def report(info: dict[str, Any], results: list[ModelResult]) -> str:
    """Everything measured, as the Markdown block that goes into the README."""
    m, data, pre = info["machine"], info["dataset"], info["preprocessing"]
    lines = [f"{harness.measured_on(info['date'], m)}"
             f"{m['pillow']} {m['pil_version']} active, DALI installed: "
             f"{'yes' if m['dali_installed'] else 'no'}; 1-minute load average "
             f"{m['load_average'][0]:.2f} at the start, {info['load_average_end'][0]:.2f} at "
             f"the end. Dataset: {data['files']} JPEGs, {data['bytes'] / 1e6:.0f} MB "
             f"({harness.size_mix(data['sizes'])}). Best of {info['options']['repeats']} "
             f"interleaved runs; whole benchmark {info['total_s'] / 60:.1f} min.",
             "", "Images per second (higher is better):", "", *results_table(results), ""]
    subset = [r for r in results if r.images < data["files"]]
    if subset:
        lines += [f"{', '.join(r.model for r in subset)}: (a) and (b) ran on the same "
                  f"{subset[0].images}-file subset (the first files by name, same size mix); "
                  "(c) and (d) as for the other model.", ""]
    rates = ", ".join(f"{name} {rate:.1f}" for name, rate in pre["single_process"].items())
    lines += [f"Single-process preprocessing ({pre['single_process_files']} files, chunks of "
              f"8): {rates} images/s.", *_cli_lines(info), "", "Targets:", ""]
    lines += harness.target_lines(targets(results))
    if any(r.sweep for r in results):
        lines += ["", "(a) under alternative settings (images/s, ratio to the defaults):", "",
                  *sweep_table(results)]
    return "\n".join(lines)


def _cli_lines(info: dict[str, Any]) -> list[str]:
    cli = info.get("cli")
    if not cli:
        return []
    return ["", f"CLI reference: `imgpipe score DIR --out FILE --model {cli['model']}` over "
            f"{cli['images']} files took {cli['wall_s']:.1f} s wall including start-up "
            f"({cli['images_per_s_wall']:.1f} images/s; the run itself reported "
            f"{cli['images_per_s_reported']} images/s)."]


def raw_results(info: dict[str, Any], results: list[ModelResult]) -> dict[str, Any]:
    """Everything measured, every run included, for benchmarks/results/bench-*.json."""
    rows = [{**asdict(r), "best": r.summary()} for r in results]
    return {**info, "models": rows, "targets": dict(targets(results))}


# ---------------------------------------------------------------- main


def main(argv: Optional[list[str]] = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--child"]:
        return child(argv[1])
    options = parse_args(argv)
    started = time.perf_counter()
    log(f"dataset: {options.images} images (generated once under {datasets.DATA})")
    directory = datasets.ensure_dataset(options.images)
    info = harness.run_header(directory, options, cache_disabled=True)
    info["preprocessing"] = preprocessing(directory, options)
    results = [bench_model(model, directory, info["preprocessing"]["pool"], options)
               for model in options.models]
    if options.cli:
        model = "mobilenet_v3_small" if "mobilenet_v3_small" in options.models else MODELS[0]
        log(f"CLI reference run: {model}")
        info["cli"] = measure_cli(model, directory)
    info["load_average_end"] = os.getloadavg()
    info["total_s"] = time.perf_counter() - started
    block = report(info, results)
    print(block)
    print(f"\nraw results: {harness.save_json('bench', raw_results(info, results), options.quick)}")
    if options.write_readme:
        harness.update_readme("results", block, "## Results")
    return 0


if __name__ == "__main__":
    sys.exit(main())
