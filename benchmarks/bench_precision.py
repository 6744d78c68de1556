"""bf16 with its weights converted once against bf16 under autocast (the path
it replaced) and fp32: EfficientNet-Lite0's accuracy on the 100 labelled
photographs and its model-only speed at batch 32, on the CPU.

`TorchBackend` converts a copy of the weights at setup and feeds it input of
that dtype; `Autocast` below is the path it replaced (fp32 weights, each
forward under `torch.autocast`), kept here to measure against. Accuracy:
top-1 and top-5 against the labels, top-1 agreement with fp32 and the
largest difference of any softmax probability, over the photographs
preprocessed as in production. Speed: model only (staging, normalisation,
the model, as the engine calls it) on one batch of 32 of the photographs,
one timed call per variant per round after a warm-up call; the variants
alternate, each first in turn, `--repeats` rounds; medians, and the median
of the per-round ratios. Each call is timed on the wall clock and in the
process's CPU time: on a machine shared with other work the second moves
far less.

    .venv/bin/python -m benchmarks.bench_precision [--repeats 5] [--precision bf16]
"""

from __future__ import annotations

import csv
import datetime as dt
import statistics
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Optional

import numpy as np
import torch

from benchmarks import datasets, harness
from benchmarks.harness import BATCH
from pipeline.backends import TorchBackend
from pipeline.backends.calibration import preprocessed
from pipeline.models import LoadedModel, load_model
from pipeline.spec import InputLimits, PreprocessSpec

CPU = torch.device("cpu")


class Autocast(TorchBackend):
    """The previous reduced-precision path: fp32 weights, each forward under autocast."""

    def __init__(self, model: LoadedModel, precision: str) -> None:
        super().__init__(model, CPU, BATCH, PreprocessSpec().output_shape, precision=precision)
        self.autocast_dtype, self.dtype = self.dtype, torch.float32

    def _forward(self, samples: Sequence[np.ndarray]) -> tuple[torch.Tensor, ...]:
        with torch.autocast(self.device.type, dtype=self.autocast_dtype):
            return super()._forward(samples)


def backends(model: LoadedModel, precision: str) -> dict[str, TorchBackend]:
    """fp32, `precision` under autocast and `precision` converted, set up."""
    shape = PreprocessSpec().output_shape
    made = {"fp32": TorchBackend(model, CPU, BATCH, shape),
            f"{precision}, autocast (before)": Autocast(model, precision),
            f"{precision}, converted weights (now)": TorchBackend(model, CPU, BATCH, shape,
                                                                  precision=precision)}
    for backend in made.values():
        backend.setup()
    return made


def photographs(directory: Path) -> tuple[list[np.ndarray], list[int]]:
    """The labelled photographs, preprocessed as in production, and their class indices."""
    with open(directory / "labels.csv", encoding="utf-8", newline="") as handle:
        rows = list(csv.DictReader(handle))
    paths = [str(directory / row["file"]) for row in rows]
    pixels = preprocessed(paths, PreprocessSpec(), InputLimits())
    if len(pixels) != len(paths):
        raise RuntimeError(f"{len(paths) - len(pixels)} photographs did not decode")
    return list(pixels.values()), [int(row["index"]) for row in rows]


def probabilities(backend: TorchBackend, photos: list[np.ndarray]) -> np.ndarray:
    logits = torch.cat([backend.predict(photos[i:i + BATCH])
                        for i in range(0, len(photos), BATCH)])
    return torch.softmax(logits.double(), dim=1).numpy()


def accuracy(probs: np.ndarray, labels: list[int], reference: np.ndarray) -> dict[str, Any]:
    ranked = np.argsort(-probs, axis=1, kind="stable")[:, :5]
    truth = np.array(labels)
    return {"top1": int((ranked[:, 0] == truth).sum()),
            "top5": int((ranked == truth[:, None]).any(axis=1).sum()),
            "agreement": int((ranked[:, 0] == reference.argmax(axis=1)).sum()),
            "max_difference": float(np.abs(probs - reference).max()), "images": len(labels)}


def one_call(backend: TorchBackend, batch: list[np.ndarray]) -> dict[str, float]:
    """Images per second of one call, on the wall clock and in CPU time."""
    wall, cpu = time.perf_counter(), time.process_time()
    backend.predict(batch)
    return {"wall": len(batch) / (time.perf_counter() - wall),
            "cpu": len(batch) / (time.process_time() - cpu)}


def speeds(made: dict[str, TorchBackend], batch: list[np.ndarray],
           repeats: int) -> dict[str, list[dict[str, float]]]:
    """One call each per round, the variants alternating, each first in turn."""
    for backend in made.values():
        backend.predict(batch)  # warm-up: first-call allocations
    names = list(made)
    rates: dict[str, list[dict[str, float]]] = {name: [] for name in names}
    for repeat in range(repeats):
        order = names[repeat % len(names):] + names[:repeat % len(names)]
        for name in order:
            rates[name].append(one_call(made[name], batch))
            harness.log(f"round {repeat + 1}/{repeats} {name}: {rates[name][-1]}")
    return rates


def run(args: Any) -> dict[str, Any]:
    info: dict[str, Any] = {
        "date": dt.datetime.now().astimezone().strftime("%Y-%m-%d %H:%M %Z"),
        "machine": harness.machine(), "options": vars(args)}
    photos, labels = photographs(args.images)
    made = backends(load_model(), args.precision)
    harness.log(f"set up; scoring {len(photos)} photographs with each")
    probs = {name: probabilities(backend, photos) for name, backend in made.items()}
    info["accuracy"] = {name: accuracy(p, labels, probs["fp32"]) for name, p in probs.items()}
    info["batch"] = len(photos[:BATCH])
    info["speed"] = speeds(made, photos[:BATCH], args.repeats)
    for backend in made.values():
        backend.close()
    return info


def share(acc: dict[str, Any], key: str) -> str:
    return f"{100 * acc[key] / acc['images']:.0f}%"


def report(n: dict[str, Any]) -> str:
    names = list(n["accuracy"])
    lines = [harness.measured_on(n), "",
             f"EfficientNet-Lite0 on the CPU, {torch.get_num_threads()} threads.", "",
             f"Accuracy over the {n['accuracy'][names[0]]['images']} labelled photographs:",
             "", "| variant | top-1 | top-5 | top-1 agreement with fp32 | largest probability "
             "difference |", "|---|---:|---:|---:|---:|"]
    for name, acc in n["accuracy"].items():
        lines.append(f"| {name} | {share(acc, 'top1')} | {share(acc, 'top5')} | "
                     f"{share(acc, 'agreement')} | {acc['max_difference']:.3f} |")
    return "\n".join([*lines, "", *speed_lines(n, names)])


def speed_lines(n: dict[str, Any], names: list[str]) -> list[str]:
    med = statistics.median
    rounds = len(n["speed"][names[0]])
    lines = [f"Model only at batch {n['batch']}, one call per variant per round, {rounds} "
             f"alternating rounds; images per second on the wall clock and per second of "
             f"the process's CPU time, medians and each round:", "",
             "| variant | images/s | per round | images per CPU s | per round |",
             "|---|---:|---|---:|---|"]
    for name in names:
        wall, cpu = ([run[key] for run in n["speed"][name]] for key in ("wall", "cpu"))
        lines.append(f"| {name} | {med(wall):.2f} | {listed(wall)} | {med(cpu):.2f} | "
                     f"{listed(cpu)} |")
    before, now = (n["speed"][name] for name in names[1:])
    for key, clock in (("wall", "wall clock"), ("cpu", "CPU time")):
        ratios = [b[key] / a[key] for a, b in zip(before, now, strict=True)]
        lines += ["", f"Converted weights / autocast, {clock}, per round: "
                  f"{med(ratios):.2f} ({listed(ratios)})."]
    return lines


def listed(values: list[float]) -> str:
    return ", ".join(f"{value:.2f}" for value in values)


def main(argv: Optional[list[str]] = None) -> int:
    parser = harness.parser(__doc__, "one round")
    parser.add_argument("--images", type=Path, default=datasets.SHARED_PHOTOS,
                        help="labelled photographs with their labels.csv")
    parser.add_argument("--precision", choices=("bf16", "fp16"), default="bf16")
    parser.add_argument("--repeats", type=int, default=5, help="alternating rounds")
    args = parser.parse_args(argv)
    if args.quick:
        args.repeats = 1
    started = time.perf_counter()
    return harness.finish("precision", args, run(args), started, report, block="precision")


if __name__ == "__main__":
    raise SystemExit(main())
