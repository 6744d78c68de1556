"""Test-time augmentation on real photographs: accuracy and what it costs.

Runs the whole `imgpipe score 'DIR/*/*.JPEG' --no-cache --topk 5 --tta MODE`
command over labelled ImageNet validation photos (`../shared/data/
imagenet-val-100`, see ../shared/data/README.md) for each mode, `--repeats`
times interleaved, and reports top-1 and top-5 against `labels.csv` and
images/s of the whole command (its own summary line: start-up included).
Prints a Markdown table; raw runs go to `benchmarks/results/tta-*.json`.

    .venv/bin/python -m benchmarks.bench_tta [--modes none hflip ten_crop] [--repeats 2]
"""

from __future__ import annotations

import argparse
import csv
import json
import re
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "imagenet-val-100"
RESULTS = ROOT / "benchmarks" / "results"
RATE = re.compile(r"in ([0-9.]+) s \(start-up ([0-9.]+) s, scoring ([0-9.]+) s\), "
                  r"([0-9.]+) images/s")


def run_once(directory: Path, model: str, mode: str, workdir: Path) -> dict[str, Any]:
    out = workdir / f"{mode}-{time.monotonic_ns()}.jsonl"
    command = [sys.executable, "-m", "workers.cli", "score", f"{directory}/*/*.JPEG",
               "--no-cache", "--topk", "5", "--tta", mode, "--model", model, "--out", str(out)]
    done = subprocess.run(command, capture_output=True, text=True, cwd=ROOT, check=True)
    match = RATE.search(done.stderr)
    assert match, done.stderr
    wall, startup, scoring, rate = (float(group) for group in match.groups())
    records = [json.loads(line) for line in out.read_text().splitlines()[1:]]
    return {"mode": mode, "wall_s": wall, "startup_s": startup, "scoring_s": scoring,
            "images_per_s": rate, "records": records, "summary": done.stderr.strip()}


def accuracy(records: list[dict[str, Any]], labels: dict[str, int],
             directory: Path) -> tuple[float, float, int]:
    top1 = top5 = 0
    assert len(records) == len(labels) and all(r["status"] == "ok" for r in records)
    for record in records:
        truth = labels[Path(record["path"]).relative_to(directory).as_posix()]
        ranked = [p["index"] for p in record["predictions"]]
        top1 += ranked[0] == truth
        top5 += truth in ranked[:5]
    return top1 / len(records), top5 / len(records), len(records)


def top1_by_path(records: list[dict[str, Any]], labels: dict[str, int],
                 directory: Path) -> dict[str, bool]:
    paths = {record["path"]: Path(record["path"]).relative_to(directory).as_posix()
             for record in records}
    return {paths[r["path"]]: r["predictions"][0]["index"] == labels[paths[r["path"]]]
            for r in records}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=DATA)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--modes", nargs="+", default=["none", "hflip", "ten_crop"])
    parser.add_argument("--repeats", type=int, default=2)
    args = parser.parse_args(argv)
    with open(args.images / "labels.csv", newline="") as handle:
        labels = {row["file"]: int(row["index"]) for row in csv.DictReader(handle)}
    runs: dict[str, list[dict[str, Any]]] = {mode: [] for mode in args.modes}
    with tempfile.TemporaryDirectory() as workdir:
        # A first run exports the model (once per machine): not a measurement.
        run_once(args.images, args.model, "none", Path(workdir))
        for _ in range(args.repeats):
            for mode in args.modes:  # interleaved: drift on a shared machine hits every mode
                runs[mode].append(run_once(args.images, args.model, mode, Path(workdir)))
    print("| `--tta` | views | top-1 | top-5 | images/s (whole command) | scoring s | "
          "start-up s |\n|---|---|---|---|---|---|---|")
    table = []
    views = {"none": 1, "hflip": 2, "five_crop": 5, "ten_crop": 10}
    for mode, measured in runs.items():
        top1, top5, count = accuracy(measured[0]["records"], labels,
                                     args.images)
        for other in measured[1:]:  # deterministic: every repeat scores the same
            assert accuracy(other["records"], labels, args.images) == (top1, top5, count)
        rate = statistics.median(run["images_per_s"] for run in measured)
        scoring = statistics.median(run["scoring_s"] for run in measured)
        startup = statistics.median(run["startup_s"] for run in measured)
        print(f"| `{mode}` | {views[mode]} | {top1:.0%} ({round(top1 * count)}/{count}) | "
              f"{top5:.0%} ({round(top5 * count)}/{count}) | {rate:.1f} | {scoring:.1f} | "
              f"{startup:.1f} |")
        table.append({"mode": mode, "top1": top1, "top5": top5, "images": count,
                      "images_per_s": [run["images_per_s"] for run in measured],
                      "scoring_s": [run["scoring_s"] for run in measured],
                      "startup_s": [run["startup_s"] for run in measured]})
    if "none" in runs:  # which photos a mode turns right or wrong, against none
        baseline = top1_by_path(runs["none"][0]["records"], labels, args.images)
        for mode in runs:
            if mode != "none":
                mine = top1_by_path(runs[mode][0]["records"], labels, args.images)
                fixed = sorted(path for path in mine if mine[path] and not baseline[path])
                broken = sorted(path for path in mine if baseline[path] and not mine[path])
                print(f"{mode}: right where none was wrong: {fixed or 'none'}; wrong where "
                      f"none was right: {broken or 'none'}")
    RESULTS.mkdir(exist_ok=True)
    stamp = time.strftime("%Y%m%d-%H%M%S")
    (RESULTS / f"tta-{stamp}.json").write_text(json.dumps(
        {"model": args.model, "images": str(args.images), "table": table,
         "summaries": {mode: [run["summary"] for run in measured]
                       for mode, measured in runs.items()}}, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
