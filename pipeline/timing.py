"""Timing helpers shared by `bench` and `optimize`: calls timed, latencies summed up."""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any

import numpy as np


def timed_calls(call: Callable[[], Any], seconds: float) -> list[float]:
    """Seconds per call, calling until `seconds` have passed (at least 3 calls)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(latencies) < 3 or time.perf_counter() < deadline:
        started = time.perf_counter()
        call()
        latencies.append(time.perf_counter() - started)
    return latencies


def percentiles(latencies: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
    return float(p50), float(p99)
