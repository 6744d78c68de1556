"""Workers and threads are sized by the cores this process may use: its affinity
and the CPU quota of its cgroup (or any above it), not the host's core count."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from pipeline.cores import cpu_quota, usable_cores


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def test_a_v2_quota_anywhere_above_the_process_counts(tmp_path: Path) -> None:
    # a service with no limit of its own, in a slice capped at 1.5 cores
    write(tmp_path / "cpu.max", "max 100000\n")
    write(tmp_path / "system.slice" / "cpu.max", "150000 100000\n")
    write(tmp_path / "system.slice" / "imgpipe@0.service" / "cpu.max", "max 100000\n")
    assert cpu_quota(tmp_path, "0::/system.slice/imgpipe@0.service\n") == 1.5


def test_the_tightest_quota_wins(tmp_path: Path) -> None:
    write(tmp_path / "a" / "cpu.max", "400000 100000\n")
    write(tmp_path / "a" / "b" / "cpu.max", "200000 100000\n")
    assert cpu_quota(tmp_path, "0::/a/b\n") == 2.0


def test_a_v1_quota_counts_and_minus_one_means_none(tmp_path: Path) -> None:
    write(tmp_path / "cpu" / "docker" / "cpu.cfs_quota_us", "250000\n")
    write(tmp_path / "cpu" / "docker" / "cpu.cfs_period_us", "100000\n")
    assert cpu_quota(tmp_path, "4:memory:/docker\n3:cpu:/docker\n") == 2.5
    write(tmp_path / "cpu" / "docker" / "cpu.cfs_quota_us", "-1\n")
    assert cpu_quota(tmp_path, "3:cpu:/docker\n") is None


def test_no_quota_files_means_no_quota(tmp_path: Path) -> None:
    assert cpu_quota(tmp_path, "0::/\n") is None
    assert cpu_quota(tmp_path, "") is None


@pytest.mark.skipif(shutil.which("taskset") is None or not hasattr(os, "sched_getaffinity"),
                    reason="needs taskset and sched_getaffinity (Linux)")
def test_a_process_pinned_to_one_core_counts_one() -> None:
    pinned = subprocess.run(
        ["taskset", "-c", str(min(os.sched_getaffinity(0))), sys.executable, "-c",
         "from pipeline.cores import usable_cores; print(usable_cores())"],
        capture_output=True, text=True, check=True)
    assert pinned.stdout.strip() == "1"
    assert 1 <= usable_cores() <= (os.cpu_count() or 1)
