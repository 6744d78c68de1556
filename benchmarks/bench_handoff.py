"""How preprocessed pixels come back from the workers: pickled through the pool's
pipe, or through shared-memory slots (`preprocess.handoff`).

(a) The hand-off alone: `PreprocessPool` (pillow, one worker per core, default
chunk size) over small synthetic 224x224 JPEGs, so that decoding is cheap and
the hand-off counts, with a consumer that drops every item. (b) The whole
command a user types, `imgpipe score DIR` with the defaults (a fresh cache
directory each run, so every image is decoded) over the 100 ImageNet photos of
../shared/data in one flat directory. Each pair alternates which hand-off runs
first, so drift on a shared machine hits both. Also timed: the parent's copy
out of a slot, per item.

    .venv/bin/python -m benchmarks.bench_handoff [--images 1000] [--repeats 4]
"""

from __future__ import annotations

import json
import os
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

import numpy as np
from PIL import Image

from benchmarks import datasets, harness

MODES = ("pickle", "shared_memory")
SIDE = 224


def small_jpegs(count: int) -> Path:
    """`count` 224x224 JPEGs cut from the sample photographs, made once."""
    directory = datasets.DATA / f"handoff-{SIDE}px-n{count}-v1"
    if (directory / datasets.COMPLETE).exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    sources = [Image.open(path).convert("RGB") for path in sorted(datasets.SAMPLES.iterdir())]
    rng = np.random.default_rng(0)
    for index in range(count):
        source = sources[index % len(sources)]
        side = int(rng.integers(SIDE, min(source.size) + 1))
        left = int(rng.integers(0, source.width - side + 1))
        top = int(rng.integers(0, source.height - side + 1))
        tile = source.crop((left, top, left + side, top + side)).resize((SIDE, SIDE))
        tile.save(directory / f"{index:05d}.jpg", quality=90)
    (directory / datasets.COMPLETE).write_text(f"{count}\n")
    return directory


def flat_photos() -> Path:
    """The shared ImageNet photos as links in one flat directory, made once."""
    directory = datasets.DATA / "imagenet-val-100-flat"
    if (directory / datasets.COMPLETE).exists():
        return directory
    directory.mkdir(parents=True, exist_ok=True)
    for path in sorted(datasets.SHARED_PHOTOS.glob("*/*.JPEG")):
        if not (directory / path.name).exists():
            (directory / path.name).write_bytes(path.read_bytes())
    (directory / datasets.COMPLETE).write_text("done\n")
    return directory


def pool_rate(directory: Path, handoff: str) -> dict[str, Any]:
    """Images/s of the pool over `directory`, items dropped as they come."""
    from pipeline.config import load_settings
    from pipeline.items import Job
    from pipeline.preprocess.pool import PreprocessPool, WorkerPlan

    pre = load_settings(overrides={"model.device": "cpu"}).preprocess
    pool = PreprocessPool(WorkerPlan("pillow", pre.spec(), pre.limits()), harness.CORES,
                          pre.chunk_size, handoff)
    pool.start()
    try:
        jobs = [Job(str(path)) for path in datasets.list_images(directory)]
        started = time.perf_counter()
        errors = sum(item.error is not None for item in pool.map(jobs))
        seconds = time.perf_counter() - started
    finally:
        pool.close()
    if errors:
        raise RuntimeError(f"{handoff}: {errors} errors")
    return {"images_per_s": len(jobs) / seconds, "through_slots": pool.slots.copied}


def command_rate(directory: Path, handoff: str, scratch: Path) -> dict[str, Any]:
    """The whole `imgpipe score DIR` with the defaults: wall s and its own summary."""
    run = scratch / f"{handoff}-{time.monotonic_ns()}"
    env = {**os.environ, "IMGPIPE_PREPROCESS__HANDOFF": handoff}
    timings, stderr = harness.score_command(
        [harness.IMGPIPE, "score", str(directory), "--out", f"{run}.jsonl",
         "--cache-dir", f"{run}-cache"], env)
    records = Path(f"{run}.jsonl").read_text().splitlines()[1:]
    if len(records) != len(datasets.list_images(directory)) or \
            any(json.loads(line)["status"] != "ok" for line in records):
        raise RuntimeError(f"{handoff}: not every photo was scored:\n{stderr}")
    return timings


def copy_out_us(shape: tuple[int, ...] = (3, SIDE, SIDE), seconds: float = 1.0) -> float:
    """Microseconds the parent spends copying one item out of a slot."""
    slot = np.zeros(shape, np.uint8)
    calls, started = 0, time.perf_counter()
    while time.perf_counter() - started < seconds:
        slot.copy()
        calls += 1
    return (time.perf_counter() - started) / calls * 1e6


def run(args: Any) -> dict[str, Any]:
    small, photos = small_jpegs(args.images), flat_photos()
    info = harness.run_header(small, args, photos=datasets.describe(photos),
                              photos_warm_s=datasets.warm_page_cache(photos))
    info["pool"] = harness.alternating(lambda mode: pool_rate(small, mode), args.repeats,
                                       MODES)
    with tempfile.TemporaryDirectory() as scratch:
        command_rate(photos, "pickle", Path(scratch))  # exports the model once: not timed
        info["command"] = harness.alternating(
            lambda mode: command_rate(photos, mode, Path(scratch)), args.repeats, MODES)
    info["copy_out_us"] = copy_out_us()
    return info


def ratios(runs: dict[str, list[dict[str, Any]]], key: str, higher: bool = True) -> list[float]:
    """shared memory / pickle in each pair (a speed-up above 1)."""
    return [(s[key] / p[key]) if higher else (p[key] / s[key])
            for p, s in zip(runs["pickle"], runs["shared_memory"], strict=True)]


def report(n: dict[str, Any]) -> str:
    med = statistics.median
    pool, command = n["pool"], n["command"]
    rows = [("(a) hand-off alone: pool, null consumer, images/s", pool, "images_per_s", True),
            ("(b) `imgpipe score DIR`, whole command, wall s", command, "wall_s", False),
            ("(b) its own summary, images/s (start-up included)", command, "images_per_s", True),
            ("(b) its scoring s (start-up excluded)", command, "scoring_s", False)]
    lines = [harness.measured_on(n), "",
             f"(a) {n['dataset']['files']} synthetic {SIDE}x{SIDE} JPEGs, {harness.CORES} "
             f"workers, chunk size 8; (b) the 100 photos of imagenet-val-100 in one flat "
             f"directory, default settings, a fresh cache directory each run. "
             f"{len(pool['pickle'])} alternating pairs each; medians, and the median of "
             f"the per-pair ratios.", "",
             "| measure | pickle | shared memory | shared memory / pickle (speed-up) |",
             "|---|---:|---:|---:|"]
    for name, runs, key, higher in rows:
        lines.append(f"| {name} | {med(r[key] for r in runs['pickle']):.2f} | "
                     f"{med(r[key] for r in runs['shared_memory']):.2f} | "
                     f"{med(ratios(runs, key, higher)):.3f} "
                     f"({', '.join(f'{x:.2f}' for x in ratios(runs, key, higher))}) |")
    per_image_us = 1e6 / med(r["images_per_s"] for r in pool["shared_memory"])
    lines += ["", f"Copying one {SIDE}x{SIDE} item out of its slot costs the parent "
              f"{n['copy_out_us']:.0f} us, {100 * n['copy_out_us'] / per_image_us:.1f}% of "
              f"an image's time in (a) with shared memory."]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = harness.parser(__doc__, "200 synthetic images, one pair")
    parser.add_argument("--images", type=int, default=1000)
    parser.add_argument("--repeats", type=int, default=4, help="alternating pairs")
    args = parser.parse_args(argv)
    if args.quick:
        args.images, args.repeats = 200, 1
    started = time.perf_counter()
    return harness.finish("handoff", args, run(args), started, report, block="handoff")


if __name__ == "__main__":
    raise SystemExit(main())
