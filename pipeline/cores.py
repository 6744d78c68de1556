"""How many cores this process may use: what the defaults size workers and threads by.

`os.cpu_count()` counts the host's cores; a daemon pinned to some of them
(one instance per GPU, `CPUAffinity=` in its unit, `taskset`) or limited by a
cgroup CPU quota (a container, `CPUQuota=`) that sized itself by it would run
more busy threads than it has cores, and several of them on one host would
all oversubscribe the same CPUs.
"""

from __future__ import annotations

import math
import os
from pathlib import Path
from typing import Optional

CGROUP_ROOT = Path("/sys/fs/cgroup")
PROC_CGROUP = Path("/proc/self/cgroup")


def usable_cores() -> int:
    """The cores this process may run on (its affinity), capped by its cgroup's
    CPU quota rounded up; at least 1."""
    try:
        cores = len(os.sched_getaffinity(0))
    except (AttributeError, OSError):  # not Linux
        cores = os.cpu_count() or 1
    quota = cpu_quota(CGROUP_ROOT, _read(PROC_CGROUP) or "")
    if quota is not None:
        cores = min(cores, math.ceil(quota))
    return max(1, cores)


def cpu_quota(root: Path, membership: str) -> Optional[float]:
    """The tightest CPU quota, in cores, on this process's cgroup or any cgroup
    above it; None when there is none. `membership` is /proc/self/cgroup's text."""
    quotas = []
    for line in membership.splitlines():
        _, controllers, path = line.split(":", 2)
        if controllers == "":  # cgroup v2: cpu.max, "max 100000" or "QUOTA PERIOD"
            quotas += [_v2_quota(directory) for directory in _upwards(root, path)]
        elif "cpu" in controllers.split(","):  # v1: cpu.cfs_quota_us (-1: none)
            quotas += [_v1_quota(directory)
                       for directory in _upwards(root / controllers, path)]
    found = [quota for quota in quotas if quota is not None]
    return min(found, default=None)


def _upwards(root: Path, path: str) -> list[Path]:
    """`root/path` and each directory above it, up to `root` itself."""
    directory = root / path.strip("/")
    return [directory, *[parent for parent in directory.parents if root in parent.parents
                         or parent == root]]


def _v2_quota(directory: Path) -> Optional[float]:
    try:
        quota, period = (_read(directory / "cpu.max") or "").split()[:2]
        return None if quota == "max" else int(quota) / int(period)
    except ValueError:
        return None


def _v1_quota(directory: Path) -> Optional[float]:
    try:
        quota = int(_read(directory / "cpu.cfs_quota_us") or "")
        period = int(_read(directory / "cpu.cfs_period_us") or "")
    except ValueError:
        return None
    return quota / period if quota > 0 and period > 0 else None


def _read(path: Path) -> Optional[str]:
    try:
        return path.read_text()
    except OSError:
        return None
