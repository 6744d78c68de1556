"""What the benchmarks share: the run header, progress lines, the raw results as
JSON under benchmarks/results/, the Markdown block in benchmarks/README.md, and
rates and latencies from timed calls.

No torch at import: the scripts set OMP_WAIT_POLICY before it loads.
"""

from __future__ import annotations

import datetime as dt
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from benchmarks import datasets
from pipeline.preprocess.select import dali_available, pillow_implementation
from pipeline.timing import percentiles, timed_calls

REPO = Path(__file__).resolve().parent.parent
README = REPO / "benchmarks" / "README.md"
RESULTS = REPO / "benchmarks" / "results"
CORES = os.cpu_count() or 1


def log(message: str) -> None:
    print(f"[{time.strftime('%H:%M:%S')}] {message}", file=sys.stderr, flush=True)


def run_header(directory: Path, options: Any, **extra: Any) -> dict[str, Any]:
    """What a run's raw results start with: when (to the minute), on what, over which
    files, with which options; then every file is read once, so that no measurement
    pays for the disk."""
    return {"date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
            "machine": machine(), "dataset": datasets.describe(directory),
            "options": asdict(options), **extra,
            "page_cache_warm_s": datasets.warm_page_cache(directory)}


def machine() -> dict[str, Any]:
    """What the numbers were measured on."""
    import torch

    cpu = "unknown"
    with open("/proc/cpuinfo", encoding="utf-8") as handle:
        for line in handle:
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    return {"cores": CORES, "cpu": cpu, "torch": torch.__version__,
            "python": platform.python_version(), "pillow": pillow_implementation(),
            "pil_version": Image.__version__, "dali_installed": dali_available(),
            "load_average": os.getloadavg()}


def measured_on(date: str, m: dict[str, Any]) -> str:
    """The start of every results block: when, on what, with which torch."""
    return f"Measured {date} on {m['cores']} cores ({m['cpu']}), torch {m['torch']}, "


def size_mix(sizes: dict[str, int]) -> str:
    """`describe()`'s sizes, smallest first: "145 x 320x240, 161 x 640x480, ..."."""
    ordered = sorted(sizes.items(), key=lambda kv: int(kv[0].split("x")[0]))
    return ", ".join(f"{count} x {size}" for size, count in ordered)


def target_lines(checks: list[tuple[str, bool]]) -> list[str]:
    return [f"- {'met' if ok else '**NOT met**'}: {name}" for name, ok in checks]


def update_readme(name: str, block: str, heading: str) -> None:
    """Replace the text between `<!-- name:begin -->` and `<!-- name:end -->` in
    benchmarks/README.md with `block`; append it under `heading` if they are missing."""
    begin, end = f"<!-- {name}:begin -->", f"<!-- {name}:end -->"
    text = README.read_text(encoding="utf-8") if README.exists() else "# Benchmarks\n"
    fresh = f"{begin}\n{block}\n{end}"
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        text = head + fresh + rest.split(end, 1)[1]
    else:
        text = f"{text.rstrip()}\n\n{heading}\n\n{fresh}\n"
    README.write_text(text, encoding="utf-8")


def save_json(prefix: str, payload: dict[str, Any], quick: bool = False) -> Path:
    """Raw results as benchmarks/results/PREFIX-YYYYmmdd-HHMMSS[-quick].json."""
    RESULTS.mkdir(parents=True, exist_ok=True)
    stamp = dt.datetime.now().strftime("%Y%m%d-%H%M%S")
    path = RESULTS / f"{prefix}-{stamp}{'-quick' if quick else ''}.json"
    path.write_text(json.dumps(payload, indent=2, default=str) + "\n", encoding="utf-8")
    return path


def in_fresh_process(module: str, *args: str, env: dict[str, str]) -> dict[str, Any]:
    """`python -m module args` from the repository root: the JSON object on the last
    line it prints (CalledProcessError, with its stderr, if it fails)."""
    done = subprocess.run([sys.executable, "-m", module, *args], env=env, cwd=REPO,
                          capture_output=True, text=True, check=True)
    return dict(json.loads(done.stdout.strip().splitlines()[-1]))


def images_per_s(predict: Callable[[], Any], batch_size: int, seconds: float) -> float:
    """Images/s of `predict` on one batch, called for `seconds` (time in the calls)."""
    per_call = timed_calls(predict, seconds)
    return batch_size * len(per_call) / sum(per_call)


def latency_ms(seconds: list[float]) -> dict[str, float]:
    """p50, p99 and mean of latencies measured in seconds, in milliseconds."""
    p50, p99 = percentiles(seconds)
    return {"p50_ms": p50, "p99_ms": p99, "mean_ms": float(np.mean(np.array(seconds) * 1000))}
