"""The preprocessing pool's shared-memory hand-off, with real worker processes:
the pixels equal pickled ones, every slot is free again after a run and after
a worker crash, there are as many slots as the window holds jobs, and no
segment outlives the pool."""

from __future__ import annotations

import threading
import time
from collections.abc import Generator, Iterator
from pathlib import Path
from typing import cast

import numpy as np
import pytest

from pipeline.errors import ConfigError
from pipeline.items import Job, Prepared
from pipeline.preprocess import shared_slots
from pipeline.preprocess.pool import PreprocessPool, WorkerPlan
from pipeline.spec import InputLimits, PreprocessSpec
from tests.truncated_jpegs import imagenet_photos
from tests.unit.test_preprocess_pool import JOBS, pool_workers, slow_png

PHOTOS = 12  # three chunks of four: the window (2 chunks per worker) fills and is reused


@pytest.fixture(scope="module")
def photos() -> list[Path]:
    found = imagenet_photos()
    if not found:
        pytest.skip("../shared/data/imagenet-val-100 is not here")
    return found[::8][:PHOTOS]


@pytest.fixture
def pool_factory() -> Iterator[list[PreprocessPool]]:
    pools: list[PreprocessPool] = []
    yield pools
    for pool in pools:
        pool.close()


def started(pools: list[PreprocessPool], handoff: str, tta: str = "none") -> PreprocessPool:
    pool = PreprocessPool(WorkerPlan("pillow", PreprocessSpec(), InputLimits(), tta=tta),
                          workers=1, chunk_size=4, handoff=handoff)
    pools.append(pool)
    pool.start()
    return pool


def pixels_by_job(pool: PreprocessPool, jobs: list[Job]) -> dict[tuple[str, str], np.ndarray]:
    items = list(pool.map(jobs))
    assert [item.error for item in items] == [None] * len(jobs)
    return {(item.job.path, item.tta): item.pixels for item in items
            if item.pixels is not None}


@pytest.mark.parametrize("tta", ["none", "five_crop"])
def test_pixels_through_shared_memory_equal_pickled_ones(
        photos: list[Path], pool_factory: list[PreprocessPool], tta: str) -> None:
    # given the same photos, a few of them asking for more views than the run's
    # (too large for a slot: they travel pickled)
    jobs = [Job(str(path), tta="ten_crop" if index % 5 == 0 else None)
            for index, path in enumerate(photos)]
    # when one pool hands pixels back pickled and another through shared memory
    pickled = pixels_by_job(started(pool_factory, "pickle", tta), jobs)
    shared_pool = started(pool_factory, "shared_memory", tta)
    shared = pixels_by_job(shared_pool, jobs)
    # then every item has the same pixels, and those that fit came through the slots
    assert pickled.keys() == shared.keys() and len(shared) == len(jobs)
    for key, pixels in pickled.items():
        assert shared[key].shape == pixels.shape and np.array_equal(shared[key], pixels), key
    fitting = sum(job.tta is None for job in jobs)
    assert shared_pool.slots.copied == fitting
    # copies that own their memory, not views of a slot that is lent again
    assert all(shared[(str(path), tta)].base is None for path in photos[1:5])


def test_there_are_as_many_slots_as_the_window_holds_jobs(
        pool_factory: list[PreprocessPool]) -> None:
    # given a pool of two workers, four chunks of 3 in flight, ten views per item
    pool = PreprocessPool(WorkerPlan("pillow", PreprocessSpec(), InputLimits(), tta="ten_crop"),
                          workers=2, chunk_size=3, handoff="shared_memory")
    pool_factory.append(pool)
    # when it starts
    pool.start()
    # then it has one slot per job of the window, each holding ten 3x224x224 views
    assert pool.slots.slots == pool.max_chunks_in_flight * pool.chunk_size == 12
    assert pool.slots.slot_bytes == 10 * 3 * 224 * 224
    assert pool.slots.free_count == 12
    assert pool.slots.segment is not None
    assert pool.slots.segment.size >= 12 * pool.slots.slot_bytes


def test_every_slot_is_free_after_a_run_and_no_segment_outlives_close(
        photos: list[Path], pool_factory: list[PreprocessPool]) -> None:
    # given a pool handing pixels back through shared memory
    pool = started(pool_factory, "shared_memory")
    assert pool.slots.segment is not None
    segment = Path("/dev/shm") / pool.slots.segment.name
    assert segment.exists()
    # when it has preprocessed more jobs than it has slots
    items = list(pool.map([Job(str(path)) for path in photos * 2]))
    # then every slot is free again
    assert len(items) == 2 * len(photos) > pool.slots.slots
    assert pool.slots.copied == len(items)
    assert pool.slots.free_count == pool.slots.slots
    # and once closed, its segment is gone from /dev/shm
    pool.close()
    assert not segment.exists()


def test_a_run_left_early_frees_its_slots_once_its_chunks_are_done(
        photos: list[Path], pool_factory: list[PreprocessPool]) -> None:
    # given a run whose window is full
    pool = started(pool_factory, "shared_memory")
    results = cast("Generator[Prepared, None, None]",
                   pool.map([Job(str(path)) for path in photos * 2]))
    next(results)
    # when the consumer stops reading
    results.close()
    # then the chunks it left in flight give their slots back as they finish
    deadline = time.monotonic() + 60
    while pool.slots.free_count < pool.slots.slots and time.monotonic() < deadline:
        time.sleep(0.01)
    assert pool.slots.free_count == pool.slots.slots


def test_a_killed_worker_gives_its_chunks_slots_back(
        tmp_path: Path, pool_factory: list[PreprocessPool]) -> None:
    # given one worker busy with slow images, handing them back through shared memory
    image = slow_png(tmp_path / "noise.png")
    pool = started(pool_factory, "shared_memory")
    results: list[Prepared] = []
    consumer = threading.Thread(target=lambda: results.extend(
        pool.map([Job(str(image)) for _ in range(JOBS)])))
    consumer.start()
    deadline = time.monotonic() + 60
    while pool.slots.free_count == pool.slots.slots and time.monotonic() < deadline:
        time.sleep(0.01)
    # when the worker is killed while its chunks hold slots
    for worker in pool_workers():
        worker.kill()
    consumer.join(timeout=120)
    # then the run finished on a new worker and every slot is free again
    assert pool.generation >= 1
    assert [item.error for item in results] == [None] * JOBS
    assert pool.slots.free_count == pool.slots.slots


def test_auto_pickles_where_dev_shm_has_no_room_and_shared_memory_refuses(
        monkeypatch: pytest.MonkeyPatch) -> None:
    # given a /dev/shm with 1 MiB free
    monkeypatch.setattr(shared_slots, "_shm_room", lambda: 1 << 20)
    # when 2 MiB of slots are asked for, then "auto" pickles and "shared_memory" refuses
    assert shared_slots.resolve_handoff("auto", 2 << 20) == "pickle"
    assert shared_slots.resolve_handoff("auto", 1 << 19) == shared_slots.AUTO
    with pytest.raises(ConfigError, match=r"preprocess.handoff = 'shared_memory' needs 2 MiB"):
        shared_slots.resolve_handoff("shared_memory", 2 << 20)
    assert shared_slots.resolve_handoff("pickle", 2 << 20) == "pickle"
