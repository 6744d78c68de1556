"""Start-up as a user meets it: the whole `imgpipe score` command, in a fresh process.

Three cases, each the median of a few runs, next to the script a user would
write instead (benchmarks/baseline.py on the same files; it has no cache, so it
scores them all):
  (a) an empty directory;
  (b) 1,000 files (--files) that the result cache answers in full (scored once before);
  (c) the first record of a cold run: 1,000 files the cache has never seen,
      the model's cache scope known from earlier runs, `--out -` read line by
      line until the first record arrives (the script: its first record).

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
from typing import Optional

from benchmarks.datasets import SAMPLES
from benchmarks.harness import BASELINE, REPO, run_command, user_env

IMGPIPE = [sys.executable, "-m", "workers.cli", "score"]


def copies(directory: Path, count: int, tag: bytes) -> Path:
    """`count` distinct JPEGs (one sample, a different trailing byte pattern each)."""
    directory.mkdir()
    photo = (SAMPLES / "coffee.jpg").read_bytes()
    for index in range(count):
        (directory / f"{index:04}.jpg").write_bytes(photo + tag + index.to_bytes(4, "big"))
    return directory


def env_of(command: list[str]) -> Optional[dict[str, str]]:
    """The script runs with a user's environment; imgpipe sets its own."""
    return user_env() if command[:3] == BASELINE else None


def first_record_s(command: list[str]) -> float:
    """Seconds until the command's first line on stdout; then it is killed."""
    started = time.perf_counter()
    with subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL,
                          cwd=REPO, env=env_of(command)) as process:
        assert process.stdout is not None
        process.stdout.readline()
        elapsed = time.perf_counter() - started
        process.kill()
    return elapsed


def whole_s(command: list[str], runs: int) -> list[float]:
    """Wall seconds of `runs` runs of a whole command."""
    return [run_command(command, env_of(command))[0] for _ in range(runs)]


def main() -> None:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--files", type=int, default=1000, help="files in cases (b) and (c)")
    args = parser.parse_args()
    with tempfile.TemporaryDirectory() as scratch:
        root = Path(scratch)
        cache = ["--cache-dir", str(root / "cache")]
        empty = root / "empty"
        empty.mkdir()
        cached = str(copies(root / "cached", args.files, b"cached"))
        run_command([*IMGPIPE, cached, *cache])  # fills the cache, remembers the scope
        rows = [("empty directory", whole_s([*IMGPIPE, str(empty), *cache], args.runs),
                 whole_s([*BASELINE, str(empty)], args.runs)),
                (f"{args.files} files, all answered by imgpipe's result cache",
                 whole_s([*IMGPIPE, cached, *cache], args.runs),
                 whole_s([*BASELINE, cached], 1))]  # one run: about a minute
        cold: tuple[list[float], list[float]] = ([], [])
        for run in range(args.runs):
            fresh = str(copies(root / f"cold-{run}", args.files, f"cold-{run}".encode()))
            cold[0].append(first_record_s([*IMGPIPE, fresh, *cache, "--out", "-"]))
            cold[1].append(first_record_s([*BASELINE, fresh, "--out", "-"]))
            shutil.rmtree(fresh)
        rows.append(("first record of a cold run", *cold))
    print("| case | imgpipe s (median) | runs | script s (median) | runs | ratio |")
    print("|---|---:|---|---:|---|---:|")
    for name, ours, theirs in rows:
        mine, script = statistics.median(ours), statistics.median(theirs)
        print(f"| {name} | {mine:.2f} | {_listed(ours)} | {script:.2f} | {_listed(theirs)} | "
              f"{script / mine:.1f}x |")


def _listed(seconds: list[float]) -> str:
    return ", ".join(f"{s:.2f}" for s in seconds)


if __name__ == "__main__":
    main()
