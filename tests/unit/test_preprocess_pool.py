"""PreprocessPool: a worker that dies takes no innocent job down with it."""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import psutil
from PIL import Image

from pipeline.items import Job, Prepared
from pipeline.spec import InputLimits, PreprocessSpec
from workers.preprocess_pool import PreprocessPool, WorkerPlan

JOBS = 24  # about a second of decoding: the kill lands while work is in flight


def slow_png(path: Path) -> Path:
    """A PNG big and noisy enough that decoding takes a noticeable time."""
    noise = np.random.default_rng(3).integers(0, 256, (2000, 2000, 3), dtype=np.uint8)
    Image.fromarray(noise).save(path, compress_level=1)
    return path


def pool_workers() -> list[psutil.Process]:
    return [child for child in psutil.Process().children()
            if any("spawn_main" in part for part in child.cmdline())]


def test_jobs_of_a_killed_worker_are_run_again(tmp_path: Path) -> None:
    # given one worker busy with a run of slow images
    image = slow_png(tmp_path / "noise.png")
    pool = PreprocessPool(WorkerPlan("pillow", PreprocessSpec(), InputLimits()), workers=1,
                          chunk_size=4)
    pool.start()
    results: list[Prepared] = []
    try:
        consumer = threading.Thread(target=lambda: results.extend(
            pool.map([Job(str(image)) for _ in range(JOBS)])))
        consumer.start()
        deadline = time.monotonic() + 60
        while not pool.outstanding and time.monotonic() < deadline:
            time.sleep(0.01)

        # when the worker is killed mid-run (as the OOM killer would)
        for worker in pool_workers():
            worker.kill()
        consumer.join(timeout=120)
    finally:
        pool.close()

    # then the pool restarted, and every job was preprocessed all the same
    assert pool.generation >= 1
    assert len(results) == JOBS
    assert [item.error for item in results] == [None] * JOBS
    assert all(item.pixels is not None and item.pixels.shape == (3, 224, 224)
               for item in results)
