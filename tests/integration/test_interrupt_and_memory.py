"""Ctrl-C leaves a valid, resumable file; memory does not grow with the input."""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import time
from pathlib import Path

import psutil
import pytest
from PIL import Image

from tests.integration.conftest import (
    count_lines,
    read_jsonl,
    run_imgpipe,
    start_imgpipe,
    wait_for_lines,
)


def test_ctrl_c_leaves_a_valid_file_and_a_rerun_completes(samples_dir: Path,
                                                          tmp_path: Path) -> None:
    # given a few hundred photos being scored in small batches
    photos = tmp_path / "photos"
    photos.mkdir()
    for index in range(240):
        shutil.copy(samples_dir / "chelsea.jpg", photos / f"{index:03}.jpg")
    out = tmp_path / "results.jsonl"
    # (no cache: 240 identical files would otherwise be answered in a flash)
    scoring = start_imgpipe("score", str(photos), "--out", str(out), "--batch-size", "4",
                            "--no-cache")
    # when Ctrl-C arrives part way through
    wait_for_lines(out, 12, scoring)
    os.killpg(scoring.pid, signal.SIGINT)
    _, stderr = scoring.communicate(timeout=60)
    # then it exits as interrupted, and every line in the file is a whole record
    assert scoring.returncode == 130, stderr
    assert "Traceback" not in stderr
    partial = read_jsonl(out)
    assert 12 <= len(partial) < 240
    # and re-running the same command scores exactly the rest
    rerun = run_imgpipe("score", str(photos), "--out", str(out), "--batch-size", "4",
                        "--no-cache")
    assert rerun.returncode == 0, rerun.stderr
    paths = [r["path"] for r in read_jsonl(out)]
    assert len(paths) == len(set(paths)) == 240


def _tree_rss(process: psutil.Process) -> int:
    """Resident memory of a process and all of its workers, in bytes."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        with contextlib.suppress(psutil.NoSuchProcess):
            total += member.memory_info().rss
    return total


@pytest.mark.slow
def test_memory_stays_flat_over_20000_files(tiny_model: Path, tmp_path: Path) -> None:
    # given 20,000 tiny images and a model that costs nothing
    images = tmp_path / "many"
    images.mkdir()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(tmp_path / "tiny.png")
    payload = (tmp_path / "tiny.png").read_bytes()
    for index in range(20_000):
        (images / f"{index:05}.png").write_bytes(payload)
    out = tmp_path / "results.jsonl"
    # when they are scored, sampling resident memory against progress
    scoring = start_imgpipe("score", str(images), "--out", str(out), "--model", str(tiny_model),
                     "--no-cache")
    process = psutil.Process(scoring.pid)
    samples: list[tuple[int, int]] = []
    while scoring.poll() is None:
        samples.append((count_lines(out), _tree_rss(process)))
        time.sleep(0.1)
    # then the run completes and memory after the first quarter does not grow
    _, stderr = scoring.communicate()
    assert scoring.returncode == 0, stderr
    assert count_lines(out) == 20_000
    early = [rss for done, rss in samples if 4_000 <= done <= 8_000]
    late = [rss for done, rss in samples if done >= 16_000]
    assert early and late, samples
    growth_mb = (max(late) - max(early)) / 2**20
    assert growth_mb < 48, f"resident memory grew by {growth_mb:.0f} MiB"
