"""PreprocessPool: a worker that dies takes no innocent job down with it, and a
worker that dies while starting is replaced."""

from __future__ import annotations

import functools
import logging
import os
import signal
import threading
import time
from pathlib import Path
from typing import Any

import numpy as np
import psutil
import pytest
from PIL import Image

from pipeline.errors import PermanentError
from pipeline.items import Job, Prepared
from pipeline.preprocess.pool import PreprocessPool, WorkerPlan, _init_worker
from pipeline.spec import InputLimits, PreprocessSpec

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


def _killed_on_first_start(marker: str, plan: WorkerPlan, log_queue: Any) -> None:
    """A worker start-up that SIGKILLs itself the first time (`marker` not yet there),
    as the OOM killer might while a replacement starts."""
    try:
        os.close(os.open(marker, os.O_CREAT | os.O_EXCL))
    except FileExistsError:
        return _init_worker(plan, log_queue)
    os.kill(os.getpid(), signal.SIGKILL)


def _always_killed(plan: WorkerPlan, log_queue: Any) -> None:
    os.kill(os.getpid(), signal.SIGKILL)


class KilledOnFirstStart(PreprocessPool):
    def __init__(self, marker: Path) -> None:
        super().__init__(WorkerPlan("pillow", PreprocessSpec(), InputLimits()), workers=1)
        self.initializer = functools.partial(_killed_on_first_start, str(marker))


def test_a_worker_killed_while_starting_is_retried_and_the_cause_logged(
        tmp_path: Path, caplog: pytest.LogCaptureFixture, encode: Any) -> None:
    # given a pool whose first worker is killed during its start-up
    pool = KilledOnFirstStart(tmp_path / "started-once")
    # when the pool starts
    with caplog.at_level(logging.WARNING, "imgpipe.preprocess"):
        pool.start()
    try:
        # then it started on the second try, and said why the first one failed
        assert "a worker was killed by SIGKILL; retrying" in caplog.text
        png = encode(Image.new("RGB", (64, 48), (10, 200, 30)))
        [item] = list(pool.map([Job("inline", data=png)]))
        assert item.error is None and item.pixels is not None
    finally:
        pool.close()


def test_workers_that_never_start_fail_with_their_cause(tmp_path: Path) -> None:
    pool = PreprocessPool(WorkerPlan("pillow", PreprocessSpec(), InputLimits()), workers=1)
    pool.initializer = _always_killed
    with pytest.raises(PermanentError, match="3 times; the last time a worker was killed "
                                             "by SIGKILL"):
        pool.start()


def test_workers_are_immune_to_ctrl_c_from_their_first_instruction() -> None:
    # given a pool starting in the background
    pool = PreprocessPool(WorkerPlan("pillow", PreprocessSpec(), InputLimits()), workers=2)
    starting = threading.Thread(target=pool.start)
    starting.start()
    seen: dict[int, bool] = {}
    try:
        # when its workers are looked at while they start (exec'd, importing)
        while starting.is_alive():
            for worker in pool_workers():
                seen.setdefault(worker.pid, _shields_sigint(worker.pid))
        # then from the first look on, Ctrl-C (SIGINT) is blocked or ignored in each:
        # a terminal's Ctrl-C reaches the whole process group
        assert len(seen) == 2 and all(seen.values()), seen
    finally:
        starting.join()
        pool.close()


def _shields_sigint(pid: int) -> bool:
    """Whether process `pid` blocks or ignores SIGINT (from /proc/PID/status)."""
    status = Path(f"/proc/{pid}/status").read_text()
    masks = dict(line.split(":\t") for line in status.splitlines() if ":\t" in line)
    bit = 1 << (signal.SIGINT - 1)
    return bool((int(masks["SigBlk"], 16) | int(masks["SigIgn"], 16)) & bit)


class EndlessSource:
    """Chunks of one small inline PNG, as many as asked for; counts what it gave."""

    def __init__(self, png: bytes, chunk_size: int) -> None:
        self.chunk = [Job("inline.png", data=png) for _ in range(chunk_size)]
        self.given = 0

    def next_chunk(self, wait_s: float) -> list[Job]:
        self.given += 1
        return list(self.chunk)


@pytest.mark.parametrize("workers", [1, 2])
def test_no_more_than_two_chunks_per_worker_are_taken_in(workers: int, encode: Any) -> None:
    # given a source that always has more work
    pool = PreprocessPool(WorkerPlan("pillow", PreprocessSpec(), InputLimits()),
                          workers=workers, chunk_size=4)
    source = EndlessSource(encode(Image.new("RGB", (32, 32), (1, 2, 3))), chunk_size=4)
    pool.start()
    try:
        # when the first preprocessed job comes out
        results = pool.map_chunks(source)
        next(results)
        # then the source was asked for the window's worth of chunks, no more
        assert source.given == workers * 2
        assert pool.outstanding <= workers * 2 * 4
        results.close()
    finally:
        pool.close()
