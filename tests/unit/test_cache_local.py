"""The on-host tiers and the tiered cache over them, on a real disk."""

from __future__ import annotations

import logging
import multiprocessing
import random
from collections.abc import Iterator
from pathlib import Path

import diskcache
import numpy as np
import pytest

from pipeline.cache import LOGGER_NAME
from pipeline.cache.codec import CorruptEntry, decode_tensor, encode_result, encode_tensor
from pipeline.cache.keys import image_digest, tensor_key
from pipeline.cache.local import LocalTier, MemoryTier
from pipeline.cache.results import ResultCache
from pipeline.cache.tiered import MISS, TieredCache, verify_tier
from pipeline.spec import PreprocessSpec

SPEC = PreprocessSpec().digest()
KIB = 1024


def tensor_for(seed: int, shape: tuple[int, ...] = (3, 224, 224)) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def key_for(name: str) -> str:
    return tensor_key("test", image_digest(name.encode()), SPEC)


def cache_warnings(caplog: pytest.LogCaptureFixture) -> list[logging.LogRecord]:
    return [r for r in caplog.records if r.name == LOGGER_NAME and r.levelno >= logging.WARNING]


@pytest.fixture
def local(tmp_path: Path) -> Iterator[LocalTier]:
    tier = LocalTier(tmp_path / "cache", max_bytes=64 * 1024 * KIB)
    yield tier
    tier.close()


# --- LocalTier --------------------------------------------------------------

def test_local_round_trip_and_counters(local: LocalTier) -> None:
    # given an entry written to the disk tier
    blob = encode_tensor(tensor_for(0), SPEC)
    local.set("k", blob)
    # when it and a missing key are read
    hit, miss = local.get("k"), local.get("absent")
    # then the bytes come back unchanged and the counters say so
    assert hit == blob and miss is None
    assert (local.stats.hits, local.stats.misses) == (1, 1)
    assert local.stats.bytes_read == local.stats.bytes_written == len(blob)
    assert local.entry_count() == 1 and list(local.iter_keys()) == ["k"]


def test_local_survives_reopening(tmp_path: Path) -> None:
    # given an entry written by one LocalTier, which is then closed
    first = LocalTier(tmp_path / "cache", max_bytes=10 * 1024 * KIB)
    first.set("k", b"value")
    first.close()
    # when another opens the same directory (another run) / then the entry is there
    second = LocalTier(tmp_path / "cache", max_bytes=10 * 1024 * KIB)
    assert second.get("k") == b"value"
    second.close()


def test_volume_stays_bounded_when_writing_far_more_than_the_limit(tmp_path: Path) -> None:
    # given a 1 MiB cache
    limit = 1024 * KIB
    tier = LocalTier(tmp_path / "cache", max_bytes=limit)
    # when 6 MiB of 64 KiB entries are written
    for i in range(96):
        tier.set(f"k{i}", bytes([i]) * (64 * KIB))
        # then the volume never exceeds the limit by more than one entry
        assert tier.volume_bytes() <= limit + 64 * KIB
    # and the value files on disk are within the limit too
    value_files = [p for p in (tmp_path / "cache").rglob("*.val")]
    assert sum(p.stat().st_size for p in value_files) <= limit
    assert tier.get("k95") == bytes([95]) * (64 * KIB)
    assert tier.get("k0") is None
    tier.close()


def test_eviction_is_least_recently_used_not_least_recently_stored(tmp_path: Path) -> None:
    # given 20 entries in a 2 MiB cache, the oldest of which is then read
    tier = LocalTier(tmp_path / "cache", max_bytes=2048 * KIB)
    for i in range(20):
        tier.set(f"old{i}", bytes(64 * KIB))
    assert tier.get("old0") is not None
    # when new entries are written until the first eviction takes old1
    # (listing keys, unlike reading them, does not count as a use)
    for i in range(100):
        tier.set(f"new{i}", bytes(64 * KIB))
        if "old1" not in set(tier.iter_keys()):
            break
    # then old0, stored first but read recently, is still there
    keys = set(tier.iter_keys())
    assert "old1" not in keys and "old2" not in keys
    assert "old0" in keys
    tier.close()


def test_unwritable_directory_disables_the_tier_with_one_warning(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    # given a cache directory under a regular file (root ignores chmod, not this)
    (tmp_path / "file").write_text("not a directory")
    tier = LocalTier(tmp_path / "file" / "cache", max_bytes=1024 * KIB)
    caplog.set_level(logging.WARNING, logger=LOGGER_NAME)
    # when it is used in every way
    assert tier.setup() is False
    for _ in range(3):
        tier.set("k", b"value")
        assert tier.get("k") is None
    tier.delete("k")
    assert (tier.entry_count(), tier.volume_bytes(), tier.clear()) == (0, 0, 0)
    assert list(tier.iter_keys()) == []
    tier.close()
    # then nothing was raised, one warning names the directory, the tier reports off
    warnings = cache_warnings(caplog)
    assert len(warnings) == 1 and "file/cache" in warnings[0].getMessage()
    assert tier.stats.available is False and tier.stats.hits == 0


class ListHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__()
        self.records: list[logging.LogRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(record)


def _write_past_a_file_size_limit(directory: str) -> tuple[bool, bytes | None, bool, list[str]]:
    """In a child process: cap file sizes (a full disk, in effect), then use the tier."""
    import resource
    import signal

    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
    resource.setrlimit(resource.RLIMIT_FSIZE, (1024 * KIB, 1024 * KIB))
    handler = ListHandler()
    logging.getLogger(LOGGER_NAME).addHandler(handler)
    tier = LocalTier(Path(directory), max_bytes=64 * 1024 * KIB)
    tier.set("small", b"s" * (64 * KIB))
    before = tier.get("small") is not None
    tier.set("big", b"b" * (2048 * KIB))  # the value file cannot grow this large
    tier.set("big", b"b" * (2048 * KIB))
    warnings = [r.getMessage() for r in handler.records if r.levelno >= logging.WARNING]
    return before, tier.get("small"), tier.stats.available, warnings


def test_a_full_disk_disables_the_tier_with_one_warning(tmp_path: Path) -> None:
    # given a process whose files cannot grow past 1 MiB
    with multiprocessing.get_context("spawn").Pool(1) as pool:
        # when it writes an entry that fits and then one that does not
        before, after, available, warnings = pool.apply(
            _write_past_a_file_size_limit, (str(tmp_path / "cache"),))
    # then the first worked, the second disabled the tier quietly, with one warning
    assert before is True
    assert after is None and available is False
    assert len(warnings) == 1 and "disabled" in warnings[0]


def _hammer(directory: str, worker: int, rounds: int) -> dict[str, int]:
    """In a child process: write and read the same few keys as the other workers."""
    tier = LocalTier(Path(directory), max_bytes=1536 * KIB)  # ~10 tensors: constant eviction
    rng = random.Random(worker)
    counts = {"ok": 0, "miss": 0, "corrupt": 0}
    for _ in range(rounds):
        name = f"img{rng.randrange(16)}"
        tier.set(key_for(name), encode_tensor(tensor_for(worker), SPEC))
        blob = tier.get(key_for(f"img{rng.randrange(16)}"))
        if blob is None:
            counts["miss"] += 1
            continue
        try:
            decode_tensor(blob, SPEC)
            counts["ok"] += 1
        except CorruptEntry:
            counts["corrupt"] += 1
    tier.close()
    return counts


def test_processes_writing_the_same_keys_never_read_a_corrupt_entry(tmp_path: Path) -> None:
    # given four processes sharing one small cache directory
    directory = str(tmp_path / "cache")
    with multiprocessing.get_context("spawn").Pool(4) as pool:
        # when each writes and reads the same 16 keys, with evictions all the while
        results = pool.starmap(_hammer, [(directory, worker, 60) for worker in range(4)])
    # then every read was a whole entry or a miss, never a torn or mixed one
    assert sum(r["corrupt"] for r in results) == 0
    assert sum(r["ok"] for r in results) > 0


def test_entry_tampered_on_disk_is_detected_deleted_and_missed(tmp_path: Path) -> None:
    # given a tensor stored in the disk tier
    tier = LocalTier(tmp_path / "cache", max_bytes=64 * 1024 * KIB)
    cache = TieredCache([tier])
    key = key_for("photo.jpg")
    cache.put_tensor(key, tensor_for(1), SPEC)
    assert cache.flush(5)
    # when one byte of its value file is changed behind the cache's back
    with diskcache.Cache(str(tmp_path / "cache")) as raw:
        handle = raw.get(key, read=True)
        value_file = Path(handle.name)
        handle.close()
    data = bytearray(value_file.read_bytes())
    data[len(data) // 2] ^= 0xFF
    value_file.write_bytes(bytes(data))
    # then reading it is a miss, the entry is gone and the corruption is counted
    assert cache.get_tensor(key, SPEC) == (None, MISS)
    assert tier.get(key) is None and not value_file.exists()
    assert cache.stats.corrupt == 1 and tier.stats.errors == 1
    # and the recomputed tensor is served next time
    cache.put_tensor(key, tensor_for(1), SPEC)
    cache.flush(5)
    array, source = cache.get_tensor(key, SPEC)
    assert source == "local" and array is not None
    np.testing.assert_array_equal(array, tensor_for(1))
    cache.close()


def test_verify_deletes_exactly_the_corrupt_entries(local: LocalTier) -> None:
    # given three good entries, one damaged and one under a foreign key
    for i in range(3):
        local.set(key_for(f"good{i}"), encode_tensor(tensor_for(i, (3, 8, 8)), SPEC))
    local.set(key_for("bad"), encode_tensor(tensor_for(9, (3, 8, 8)), SPEC)[:-1])
    local.set("stray", b"whatever")
    # when the tier is verified
    report = verify_tier(local)
    # then the two bad ones are deleted and the rest kept
    assert (report.checked, report.corrupt) == (5, 2)
    assert sorted(local.iter_keys()) == sorted(key_for(f"good{i}") for i in range(3))


def test_clear_empties_the_tier(local: LocalTier) -> None:
    for i in range(5):
        local.set(f"k{i}", b"v")
    assert local.clear() == 5
    assert local.entry_count() == 0


# --- TieredCache over on-host tiers -----------------------------------------

@pytest.fixture
def memory_then_local(local: LocalTier) -> Iterator[TieredCache]:
    cache = TieredCache([MemoryTier(16 * 1024 * KIB), local])
    yield cache
    cache.close()


def test_read_through_takes_the_first_tier_and_promotes(
        memory_then_local: TieredCache) -> None:
    memory, local = memory_then_local.tiers
    # given a value only in the second tier, and a key in both with different values
    local.set("only-local", b"L")
    memory.set("both", b"M")
    local.set("both", b"L")
    # when they are read
    assert memory_then_local.get("both") == (b"M", "memory")
    assert memory_then_local.get("only-local") == (b"L", "local")
    assert memory_then_local.get("nowhere") == (None, MISS)
    # then the second-tier hit was promoted into the first
    assert memory_then_local.flush(5)
    assert memory.get("only-local") == b"L"
    assert memory_then_local.get("only-local") == (b"L", "memory")
    assert memory_then_local.stats.hits == {"memory": 2, "local": 1}
    assert memory_then_local.stats.misses == 1


def test_corrupt_first_tier_falls_through_and_is_repaired(
        memory_then_local: TieredCache) -> None:
    memory, local = memory_then_local.tiers
    # given a damaged tensor in memory and a good one on disk
    key, good = key_for("x"), encode_tensor(tensor_for(3, (3, 4, 4)), SPEC)
    memory.set(key, good[:-3])
    local.set(key, good)
    # when it is read
    array, source = memory_then_local.get_tensor(key, SPEC)
    # then the disk copy is served and, once written back, memory is good again
    assert source == "local" and array is not None
    assert memory_then_local.stats.corrupt == 1 and memory.stats.errors == 1
    memory_then_local.flush(5)
    assert memory.get(key) == good


def test_put_reaches_every_tier_after_flush(memory_then_local: TieredCache) -> None:
    assert memory_then_local.put("k", b"v") is True
    assert memory_then_local.flush(5) is True
    assert [tier.get("k") for tier in memory_then_local.tiers] == [b"v", b"v"]


def test_close_stores_what_was_queued_then_drops(local: LocalTier) -> None:
    # given writes queued just before close
    cache = TieredCache([local])
    for i in range(50):
        cache.put(f"k{i}", b"v")
    # when it closes / then they were stored, and later writes are dropped and counted
    cache.close()
    reopened = LocalTier(local.directory, max_bytes=local.max_bytes)
    assert reopened.entry_count() == 50
    assert cache.put("late", b"v") is False and cache.stats.dropped_writes == 1
    reopened.close()


def test_result_cache_round_trip(local: LocalTier) -> None:
    results = ResultCache(TieredCache([local]))
    predictions = [{"label": "tripod", "index": 872, "score": 0.944}]
    results.put("test:cache:r:0123456789abcdef:" + "a" * 32, predictions)
    results.cache.flush(5)
    assert results.get("test:cache:r:0123456789abcdef:" + "a" * 32, 1) == (predictions, "local")
    local.set("test:cache:r:0123456789abcdef:" + "b" * 32, encode_result(predictions)[:-1])
    assert results.get("test:cache:r:0123456789abcdef:" + "b" * 32, 1) == (None, MISS)
    results.cache.close()


def test_memory_tier_is_bounded_lru() -> None:
    tier = MemoryTier(max_bytes=3)
    for key in "abc":
        tier.set(key, b"x")
    tier.get("a")
    tier.set("d", b"x")
    assert sorted(tier.iter_keys()) == ["a", "c", "d"] and tier.volume_bytes() == 3
