"""What the benchmarks share: common options, the run header, raw results as JSON
under benchmarks/results/, the Markdown blocks in benchmarks/README.md, runs in a
fresh process (a whole command, the engine, the baseline script), accuracy, and
rates and latencies from timed calls.

No torch at import: the scripts set OMP_WAIT_POLICY before it loads.

    python -m benchmarks.harness REQUEST   # one engine run, see engine_run_fresh
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import platform
import re
import statistics
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Optional

import numpy as np
from PIL import Image

from benchmarks import datasets
from pipeline.preprocess.select import dali_available, pillow_implementation
from pipeline.timing import percentiles, timed_calls

if TYPE_CHECKING:
    from pipeline.backends import InferenceBackend
    from pipeline.config import Settings
    from pipeline.predictions import Record

REPO = datasets.REPO
README = REPO / "benchmarks" / "README.md"
RESULTS = REPO / "benchmarks" / "results"
CORES = os.cpu_count() or 1
BATCH = 32  # the engine's default max_batch_size and the baseline's batch
IMGPIPE = str(Path(sys.executable).parent / "imgpipe")  # the installed command
BASELINE = [sys.executable, "-m", "benchmarks.baseline"]  # the script a user would write
# What the imgpipe command sets for itself before torch loads (workers/cli.py):
# idle inference threads sleep instead of spinning on the workers' cores.
IMGPIPE_ENV = {"OMP_WAIT_POLICY": "PASSIVE"}


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


# ---------------------------------------------------------------- a run


def alternating(measure: Callable[[str], dict[str, Any]], repeats: int,
                modes: tuple[str, str]) -> dict[str, list[dict[str, Any]]]:
    """`repeats` pairs of measure(mode), each mode first in every other pair, so that
    drift on a shared machine hits both."""
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in modes}
    for repeat in range(repeats):
        for mode in modes if repeat % 2 == 0 else modes[::-1]:
            runs[mode].append(measure(mode))
            log(f"{mode}: {runs[mode][-1]}")
    return runs


def paired_table(columns: tuple[str, str], runs: dict[str, dict[str, list[dict[str, Any]]]],
                 modes: tuple[str, str], rows: list[tuple[str, str, str, bool]]) -> list[str]:
    """A table of `paired_row`s, one per (name, measurement, key, higher) in `rows`, each
    comparing `runs[measurement]`'s two `modes`; `columns` names those two modes."""
    first, second = columns
    lines = [f"| measure | {first} | {second} | {second} / {first} (speed-up) |",
             "|---|---:|---:|---:|"]
    for name, measurement, key, higher in rows:
        pairs = runs[measurement]
        lines.append(paired_row(name, pairs[modes[0]], pairs[modes[1]], key, higher))
    return lines


def paired_row(name: str, first: list[dict[str, Any]], second: list[dict[str, Any]],
               key: str, higher: bool) -> str:
    """A table row: each side's median of `key`, and the median of the per-pair
    speed-ups of the second over the first (`higher`: a larger value is faster)."""
    pairs = [(b[key] / a[key]) if higher else (a[key] / b[key])
             for a, b in zip(first, second, strict=True)]
    return (f"| {name} | {statistics.median(r[key] for r in first):.2f} | "
            f"{statistics.median(r[key] for r in second):.2f} | "
            f"{statistics.median(pairs):.3f} ({', '.join(f'{x:.2f}' for x in pairs)}) |")


def parser(doc: Optional[str], quick: str) -> argparse.ArgumentParser:
    """A benchmark's command line with the options every one has; `quick` says what
    --quick shrinks the run to (a quick run never rewrites the README)."""
    parsed = argparse.ArgumentParser(description=(doc or "").split("\n\n")[0])
    parsed.add_argument("--no-readme", dest="write_readme", action="store_false",
                        help="do not update benchmarks/README.md")
    parsed.add_argument("--quick", action="store_true", help=f"smoke run: {quick}")
    return parsed


def run_header(directory: Path, args: argparse.Namespace, **extra: Any) -> dict[str, Any]:
    """What a run's raw results start with: when (to the minute), on what, over which
    files, with which options; then every file is read once, so that no measurement
    pays for the disk."""
    return {"date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "machine": machine(), "dataset": datasets.describe(directory),
            "options": vars(args), **extra,
            "page_cache_warm_s": datasets.warm_page_cache(directory)}


def finish(prefix: str, args: argparse.Namespace, info: dict[str, Any], started: float,
           report: Callable[[dict[str, Any]], str], block: str = "",
           raw: Callable[[dict[str, Any]], dict[str, Any]] = dict) -> int:
    """The end of every run: load and duration, the Markdown report printed, the raw
    results saved as PREFIX-*.json, and the README's `block` rewritten with the
    report unless the run was quick or told not to."""
    info["load_average_end"] = os.getloadavg()
    info["total_s"] = time.perf_counter() - started
    text = report(info)
    print(text)
    print(f"\nraw results: {save_json(prefix, raw(info), args.quick)}")
    if block and args.write_readme and not args.quick:
        update_readme(block, text)
    return 0


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        cpu = next((line.split(":", 1)[1].strip() for line in handle
                    if line.startswith("model name")), "unknown")
    return {"cores": CORES, "cpu": cpu, "torch": torch.__version__,
            "python": platform.python_version(), "pillow": pillow_implementation(),
            "pil_version": Image.__version__, "dali_installed": dali_available(),
            "load_average": os.getloadavg()}


def measured_on(n: dict[str, Any], *software: str) -> str:
    """The start of every results block: when, on what, with which software, and the
    load around the run."""
    m = n["machine"]
    pillow = f"{m['pillow']} {m['pil_version']}"
    return (f"Measured {n['date']} on {m['cores']} cores ({m['cpu']}), torch {m['torch']}, "
            f"{', '.join([*software, pillow])}; 1-minute load "
            f"average {m['load_average'][0]:.2f} at the start, "
            f"{n['load_average_end'][0]:.2f} at the end.")


def size_mix(sizes: dict[str, int]) -> str:
    """`describe()`'s sizes, smallest first: "145 x 320x240, 161 x 640x480, ..."."""
    ordered = sorted(sizes.items(), key=lambda kv: int(kv[0].split("x")[0]))
    return ", ".join(f"{count} x {size}" for size, count in ordered)


def target_lines(checks: list[tuple[str, bool]]) -> list[str]:
    return ["Targets:", "", *(f"- {'met' if ok else '**NOT met**'}: {name}"
                              for name, ok in checks)]


def update_readme(name: str, block: str) -> None:
    """Replace the text between `<!-- name:begin -->` and `<!-- name:end -->` in
    benchmarks/README.md with `block`."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = README.read_text(encoding="utf-8")
    if begin not in text or end not in text:
        raise RuntimeError(f"benchmarks/README.md has no {begin} ... {end} block")
    head, rest = text.split(begin, 1)
    README.write_text(f"{head}{begin}\n{block}\n{end}{rest.split(end, 1)[1]}",
                      encoding="utf-8")


def save_json(prefix: str, payload: dict[str, Any], quick: bool = False) -> Path:
    """Raw results as benchmarks/results/PREFIX-YYYYmmdd-HHMMSS[-quick].json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{prefix}-{stamp}{'-quick' if quick else ''}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return path


# ---------------------------------------------------------------- fresh processes


def user_env() -> dict[str, str]:
    """The environment of a user's own script: OpenMP's default wait policy."""
    return {k: v for k, v in os.environ.items() if k != "OMP_WAIT_POLICY"}


def run_command(command: list[str], env: Optional[dict[str, str]] = None,
                timeout_s: Optional[float] = None) -> tuple[float, str, str]:
    """Wall seconds of a whole command (start-up included), its stdout and stderr;
    RuntimeError, with the end of its stderr, when it fails."""
    started = time.perf_counter()
    done = subprocess.run(command, env=env, cwd=REPO, capture_output=True, text=True,
                          timeout=timeout_s)
    wall_s = time.perf_counter() - started
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command[:4])} exited {done.returncode}:\n"
                           f"{done.stderr[-3000:]}")
    return wall_s, done.stdout, done.stderr


# The summary line `imgpipe score` ends with on stderr.
SCORE_SUMMARY = re.compile(r"in ([0-9.]+) s \(start-up ([0-9.]+) s, scoring ([0-9.]+) s\), "
                           r"([0-9.]+) images/s")


def score_command(command: list[str], env: Optional[dict[str, str]] = None
                  ) -> tuple[dict[str, float], str]:
    """A whole `imgpipe score` command: its wall seconds with its own start-up,
    scoring and images/s from its summary line; and its stderr."""
    wall_s, _, stderr = run_command(command, env)
    match = SCORE_SUMMARY.search(stderr)
    if match is None:
        raise RuntimeError(f"no summary line in:\n{stderr}")
    _, startup_s, scoring_s, rate = (float(group) for group in match.groups())
    return {"wall_s": wall_s, "images_per_s": rate, "startup_s": startup_s,
            "scoring_s": scoring_s}, stderr


def in_fresh_process(command: list[str], env: dict[str, str]) -> dict[str, Any]:
    """The JSON object on the last line a command prints."""
    return dict(json.loads(run_command(command, env)[1].strip().splitlines()[-1]))


def baseline_rate(model: str, directory: Path) -> float:
    """Images/s of the script a user would write (benchmarks/baseline.py), in its own
    process with OpenMP's default wait policy, as a user's script runs."""
    measured = in_fresh_process([*BASELINE, str(directory), "--model", model], user_env())
    return float(measured["images_per_s"])


def engine_run_fresh(model: str, directory: Path, overrides: Optional[dict[str, Any]] = None,
                     env: Optional[dict[str, str]] = None) -> tuple[float, float]:
    """`engine_run` in a fresh process with the command's environment (plus `env`):
    images/s and setup seconds."""
    request = json.dumps({"model": model, "directory": str(directory),
                          "overrides": overrides or {}})
    measured = in_fresh_process([sys.executable, "-m", "benchmarks.harness", request],
                                {**os.environ, **IMGPIPE_ENV, **(env or {})})
    return float(measured["images_per_s"]), float(measured["setup_s"])


# ---------------------------------------------------------------- the engine


def settings(model: str, extra: Optional[dict[str, Any]] = None) -> Settings:
    """The default configuration for `model` on the CPU, cache off (or re-runs would
    be hits), plus `extra` overrides."""
    from pipeline.config import load_settings

    weights = datasets.weights_for(model)
    overrides: dict[str, Any] = {"model.name": model, "model.device": "cpu",
                                 "model.weights": str(weights) if weights else None,
                                 "cache.enabled": False}
    return load_settings(overrides={**overrides, **(extra or {})})


class CountingSink:
    """Discards records and counts them."""

    def __init__(self) -> None:
        self.records = 0

    def __call__(self, records: list[Record]) -> None:
        self.records += len(records)


def engine_run(model: str, directory: Path,
               extra: Optional[dict[str, Any]] = None) -> tuple[float, float]:
    """Engine.setup() (timed on its own), then Engine.run() over `directory` with a
    sink that only counts: images/s of the run and the setup seconds."""
    from pipeline.engine import Engine
    from pipeline.sources import directory as directory_source

    engine = Engine(settings(model, extra))
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


def default_backend(model: str, batch: int) -> InferenceBackend:
    """The inference backend the engine runs on the CPU by default (ONNX Runtime
    fp32, exported once into the artifacts directory), set up for batches of up
    to `batch`, one thread per core."""
    import torch

    from pipeline.backends import backend_for
    from pipeline.backends.checked import DEFAULT_VARIANT
    from pipeline.models import load_model

    backend = backend_for(settings(model), load_model(model, datasets.weights_for(model)),
                          torch.device("cpu"), DEFAULT_VARIANT, max_batch_size=batch)
    backend.setup()
    return backend


def random_images(model: str, count: int) -> list[np.ndarray]:
    """`count` random uint8 images of the model's input shape (speed only)."""
    shape = settings(model).preprocess.spec().output_shape
    rng = np.random.default_rng(0)
    return [rng.integers(0, 256, shape, dtype=np.uint8) for _ in range(count)]


def model_only_rate(model: str, seconds: float) -> float:
    """Images/s of the engine's default CPU backend on pre-made batches of 32."""
    backend = default_backend(model, BATCH)
    batch = random_images(model, BATCH)
    rate = images_per_s(lambda: backend.predict(batch), BATCH, seconds)
    backend.close()
    return rate


def images_per_s(predict: Callable[[], Any], batch_size: int, seconds: float) -> float:
    """Images/s of `predict` on one batch, called for `seconds` (time in the calls)."""
    per_call = timed_calls(predict, seconds)
    return batch_size * len(per_call) / sum(per_call)


def latency_ms(seconds: list[float]) -> dict[str, float]:
    """p50, p99 and mean of latencies measured in seconds, in milliseconds."""
    p50, p99 = percentiles(seconds)
    return {"p50_ms": p50, "p99_ms": p99, "mean_ms": float(np.mean(np.array(seconds) * 1000))}


def accuracy(top5: dict[str, list[int]], labels: dict[str, int]) -> dict[str, float]:
    """Top-1 and top-5 accuracy, in percent, of ranked class indices per file against
    the labels (class index), over the labelled files that were scored."""
    scored = [f for f in labels if f in top5]
    top1 = sum(top5[f][0] == labels[f] for f in scored)
    within = sum(labels[f] in top5[f][:5] for f in scored)
    return {"top1": 100 * top1 / len(scored), "top5": 100 * within / len(scored),
            "images": len(scored)}


if __name__ == "__main__":  # engine_run_fresh's child: one engine run, as JSON
    spec = json.loads(sys.argv[1])
    rate, setup = engine_run(spec["model"], Path(spec["directory"]), spec["overrides"])
    print(json.dumps({"images_per_s": rate, "setup_s": setup}))
