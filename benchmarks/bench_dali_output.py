"""Where DALI's batches go in the inference process (`preprocess.dali_output`):
copied into NumPy arrays on the host ("host"), or into one torch tensor on
DALI's device whose rows the staging ring gathers there ("device").

(a) The hand-off alone: `InProcessDali` (batches of 32, two in flight) over
the 100 ImageNet photos of ../shared/data, every batch of 32 items staged
into a `StagingRing` as the model's backend stages it, nothing else. (b) The
whole command a user types with DALI and the torch backend, `imgpipe score
DIR --backend dali --model-backend torch --no-cache`, over the same photos.
The two hand-offs alternate, each first in every other pair. On the CPU,
"device" is the host too: these figures say what the structure costs there,
not what it saves on a GPU.

    .venv/bin/python -m benchmarks.bench_dali_output [--repeats 4]
"""

from __future__ import annotations

import os
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks import datasets, harness
from benchmarks.bench_handoff import flat_photos

MODES = ("host", "device")
BATCH = 32


def hand_off_rate(directory: Path, output: str) -> dict[str, Any]:
    """Images/s of DALI in this process over `directory`, each batch staged."""
    import torch

    from pipeline.backends.staging import StagingRing
    from pipeline.config import load_settings
    from pipeline.items import Job
    from pipeline.preprocess.in_process import InProcessDali
    from pipeline.preprocess.pool import WorkerPlan
    from pipeline.sources import IterableSource

    pre = load_settings(overrides={"model.device": "cpu"}).preprocess
    plan = WorkerPlan("dali", pre.spec(), pre.limits(), "cpu", harness.CORES)
    producer = InProcessDali(plan, BATCH, pre.chunk_size, output=output)
    ring = StagingRing(2, BATCH, pre.spec().output_shape, torch.device("cpu"))
    producer.launch()
    producer.wait_started()
    try:
        jobs = [Job(str(path)) for path in datasets.list_images(directory)]
        started, batch = time.perf_counter(), []
        for item in producer.map_chunks(IterableSource(jobs, pre.chunk_size)):
            batch.append(item.pixels)
            if len(batch) == BATCH:
                ring.stage(batch)
                batch = []
        if batch:
            ring.stage(batch)
        seconds = time.perf_counter() - started
    finally:
        producer.close()
    return {"images_per_s": len(jobs) / seconds}


def command_rate(directory: Path, output: str, scratch: Path) -> dict[str, Any]:
    """The whole command with DALI and torch: wall s and its own summary."""
    env = {**os.environ, "IMGPIPE_PREPROCESS__DALI_OUTPUT": output}
    out = scratch / f"{output}-{time.monotonic_ns()}.jsonl"
    timings, _ = harness.score_command(
        [harness.IMGPIPE, "score", str(directory), "--backend", "dali", "--model-backend",
         "torch", "--no-cache", "--out", str(out)], env)
    return timings


def run(args: Any) -> dict[str, Any]:
    import tempfile

    photos = flat_photos()
    info = harness.run_header(photos, args)
    info["hand_off"] = harness.alternating(lambda mode: hand_off_rate(photos, mode),
                                           args.repeats, MODES)
    with tempfile.TemporaryDirectory() as scratch:
        command_rate(photos, "host", Path(scratch))  # builds what a first run builds: not timed
        info["command"] = harness.alternating(
            lambda mode: command_rate(photos, mode, Path(scratch)), args.repeats, MODES)
    return info


def report(n: dict[str, Any]) -> str:
    rows = [("(a) hand-off alone: DALI in process, staged, images/s", "hand_off",
             "images_per_s", True),
            ("(b) whole command, wall s", "command", "wall_s", False),
            ("(b) its scoring s (start-up excluded)", "command", "scoring_s", False)]
    lines = [harness.measured_on(n, "nvidia-dali-cuda120"), "",
             f"The 100 photos of imagenet-val-100 in one flat directory; "
             f"{len(n['hand_off']['host'])} alternating pairs; medians, and the median of "
             f"the per-pair ratios.", "",
             *harness.paired_table(("host", "device"), n, ("host", "device"), rows)]
    return "\n".join(lines)


def main(argv: Optional[list[str]] = None) -> int:
    parser = harness.parser(__doc__, "one pair")
    parser.add_argument("--repeats", type=int, default=4, help="alternating pairs")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    started = time.perf_counter()
    return harness.finish("dali_output", args, run(args), started, report,
                          block="dali_output")


if __name__ == "__main__":
    raise SystemExit(main())
