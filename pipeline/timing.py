"""Timing helpers shared by `bench` and `optimize`: calls timed, latencies summed up."""

from __future__ import annotations

import sys
import time
from collections.abc import Callable, Iterable
from typing import Any

import numpy as np


def timed_calls(call: Callable[[], Any], seconds: float) -> list[float]:
    """Seconds per call, each until its result is computed, calling until `seconds`
    have passed (at least 3 calls)."""
    latencies: list[float] = []
    deadline = time.perf_counter() + seconds
    while len(latencies) < 3 or time.perf_counter() < deadline:
        started = time.perf_counter()
        settled(call())
        latencies.append(time.perf_counter() - started)
    return latencies


def settled(output: Any) -> Any:
    """`output`, once the device has computed it. A call that runs on a GPU returns
    as soon as its work is queued: timed alone, it measures the queueing."""
    device = getattr(output, "device", None)
    torch = sys.modules.get("torch")  # only a torch tensor can be on a GPU
    if torch is not None and isinstance(device, torch.device) and device.type == "cuda":
        torch.cuda.synchronize(device)
    return output


def percentiles(latencies: list[float]) -> tuple[float, float]:
    p50, p99 = np.percentile(np.array(latencies) * 1000, [50, 99])
    return float(p50), float(p99)


def warm_up(predict: Callable[[list[np.ndarray]], Any], sample_shape: tuple[int, ...],
            sizes: Iterable[int]) -> float:
    """Run one blank batch of each size (allocations, kernel choice, compilation
    happen now, not on the first real batch); the seconds it took."""
    started = time.perf_counter()
    blank = np.zeros(sample_shape, dtype=np.uint8)
    for size in sizes:
        predict([blank] * size)
    return time.perf_counter() - started
