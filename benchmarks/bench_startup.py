"""Start-up as a user meets it: the whole `imgpipe score` command, in a fresh process.

Three cases, each the median of a few runs:
  (a) an empty directory;
  (b) 1,000 files that the result cache answers in full (scored once before);
  (c) the first record of a cold run: 1,000 files the cache has never seen,
      the model's cache scope known from earlier runs, `--out -` read line by
      line until the first record arrives.

    python -m benchmarks.bench_startup [--runs 3]
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

ROOT = Path(__file__).resolve().parent.parent
IMGPIPE = [sys.executable, "-m", "pipeline.cli", "score"]
FILES = 1000


def copies(directory: Path, count: int, tag: bytes) -> Path:
    """`count` distinct JPEGs (one sample, a different trailing byte pattern each)."""
    directory.mkdir()
    photo = (ROOT / "samples" / "coffee.jpg").read_bytes()
    for index in range(count):
        (directory / f"{index:04}.jpg").write_bytes(photo + tag + index.to_bytes(4, "big"))
    return directory


def whole_command_s(*args: str) -> float:
    started = time.perf_counter()
    subprocess.run([*IMGPIPE, *args], check=True, capture_output=True, cwd=ROOT)
    return time.perf_counter() - started


def first_record_s(*args: str) -> float:
    started = time.perf_counter()
    with subprocess.Popen([*IMGPIPE, *args, "--out", "-"], stdout=subprocess.PIPE,
                          stderr=subprocess.DEVNULL, cwd=ROOT) as process:
        assert process.stdout is not None
        process.stdout.readline()
        elapsed = time.perf_counter() - started
        process.kill()
    return elapsed


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    runs = parser.parse_args().runs
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        cache = ["--cache-dir", str(root / "cache")]
        empty = root / "empty"
        empty.mkdir()
        cached = copies(root / "cached", FILES, b"cached")
        whole_command_s(str(cached), *cache)  # fills the cache, remembers the model's scope
        rows = [("empty directory", [whole_command_s(str(empty), *cache) for _ in range(runs)]),
                (f"{FILES} files, all answered by the result cache",
                 [whole_command_s(str(cached), *cache) for _ in range(runs)])]
        cold = []
        for run in range(runs):
            fresh = copies(root / f"cold-{run}", FILES, f"cold-{run}".encode())
            cold.append(first_record_s(str(fresh), *cache))
            shutil.rmtree(fresh)
        rows.append(("first record of a cold run", cold))
    print("| case | median s | runs (s) |\n|---|---:|---|")
    for name, seconds in rows:
        print(f"| {name} | {statistics.median(seconds):.2f} | "
              f"{', '.join(f'{s:.2f}' for s in seconds)} |")


if __name__ == "__main__":
    main()
