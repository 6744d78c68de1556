"""The Redis tier and the tiered cache against a real redis-server (never :6379)."""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
import redis

from pipeline.cache import LOGGER_NAME
from pipeline.cache.codec import encode_result, encode_tensor, sign_entry
from pipeline.cache.keys import image_digest, result_key, tensor_key
from pipeline.cache.local import LocalTier
from pipeline.cache.redis_tier import RedisTier
from pipeline.cache.results import ResultCache
from pipeline.cache.tiered import MISS, TieredCache, verify_tier
from pipeline.config import RedisSettings
from pipeline.spec import PreprocessSpec
from tests.integration.job_queue import add_job_queue, assert_job_queue_intact
from tests.redis_server import RedisServer, free_port
from tests.serve_daemon import wait_until

SPEC = PreprocessSpec().digest()
TTL_S = 600
Factory = Callable[[], RedisServer]


def tensor_for(seed: int) -> np.ndarray:
    return np.random.default_rng(seed).integers(0, 256, (3, 224, 224), dtype=np.uint8)


def cache_warnings(caplog: pytest.LogCaptureFixture) -> list[str]:
    return [r.getMessage() for r in caplog.records
            if r.name == LOGGER_NAME and r.levelno >= logging.WARNING]




@pytest.fixture
def tier(redis_server: RedisServer, prefix: str) -> Iterator[RedisTier]:
    made = RedisTier(redis_server.url, prefix, ttl_s=TTL_S, max_entry_bytes=1 << 20)
    yield made
    made.close()


def test_round_trip_with_ttl_under_the_prefix(tier: RedisTier, raw: redis.Redis,
                                              prefix: str) -> None:
    # given a tensor entry under the tier's prefix
    key = tensor_key(prefix, image_digest(b"a"), SPEC)
    blob = encode_tensor(tensor_for(0), SPEC)
    # when it is written and read back
    tier.set(key, blob)
    # then the bytes match, the key expires after ttl_s and sits under the prefix
    assert tier.get(key) == blob and tier.get(key + "0") is None
    assert TTL_S - 5 <= raw.ttl(key) <= TTL_S
    assert list(tier.iter_keys()) == [key]
    assert tier.volume_bytes() == len(blob) and tier.entry_count() == 1
    assert tier.stats.hits == 1 and tier.stats.misses == 1


def test_oversized_entries_are_not_written(redis_server: RedisServer,
                                           raw: redis.Redis, prefix: str) -> None:
    tier = RedisTier(redis_server.url, prefix, ttl_s=TTL_S, max_entry_bytes=1000)
    tier.set(f"{prefix}:small", bytes(1000))
    tier.set(f"{prefix}:big", bytes(1001))
    assert raw.exists(f"{prefix}:small") == 1 and raw.exists(f"{prefix}:big") == 0
    assert tier.stats.skipped == 1
    tier.close()


def test_clear_and_listing_touch_only_the_prefix(tier: RedisTier, raw: redis.Redis,
                                                 prefix: str) -> None:
    # given keys of this tier and a neighbour's key that shares the prefix's start
    own = sorted(tensor_key(prefix, image_digest(bytes([i])), SPEC) for i in range(3))
    for key in own:
        tier.set(key, b"v")
    neighbour = tensor_key(prefix + "x", image_digest(b"0"), SPEC)
    raw.set(neighbour, b"neighbour")
    # when the tier is listed and cleared
    listed = sorted(tier.iter_keys())
    removed = tier.clear()
    # then only its own keys were seen and removed
    assert listed == own and removed == 3
    assert raw.get(neighbour) == b"neighbour"
    raw.delete(neighbour)


def test_redis_down_at_start_costs_one_warning_and_nothing_else(
        caplog: pytest.LogCaptureFixture) -> None:
    # given a URL, with a password, to a port where nothing listens
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    url = f"redis://user:s3cret@127.0.0.1:{free_port()}/0"
    tier = RedisTier(url, "imgpipe", ttl_s=60, max_entry_bytes=1 << 20, retry_interval_s=60)
    # when it is set up and used
    assert tier.setup() is False
    for _ in range(1000):
        assert tier.get("imgpipe:t:x:y") is None
        tier.set("imgpipe:t:x:y", b"v")
    # then: one warning, naming host:port but never the password
    warnings = cache_warnings(caplog)
    assert len(warnings) == 1 and "127.0.0.1" in warnings[0]
    assert all("s3cret" not in r.getMessage() for r in caplog.records)
    # and the calls are ~free: only set-up tried the server (each try that fails
    # is an error), every read was a miss and every write skipped
    assert tier.stats.available is False and tier.stats.errors == 1
    assert tier.stats.misses == 1000 and tier.stats.skipped == 1000
    tier.close()


def test_server_killed_mid_run_then_back_within_the_backoff(
        redis_server_factory: Factory, caplog: pytest.LogCaptureFixture) -> None:
    # given a working tier on a dedicated server
    caplog.set_level(logging.INFO, logger=LOGGER_NAME)
    server = redis_server_factory()
    tier = RedisTier(server.url, "imgpipe", ttl_s=60, max_entry_bytes=1 << 20,
                     retry_interval_s=0.3)
    tier.set("imgpipe:k", b"before")
    assert tier.get("imgpipe:k") == b"before"
    # when the server is killed -9 mid-run
    server.stop(kill=True)
    for _ in range(20):
        assert tier.get("imgpipe:k") is None
        tier.set("imgpipe:k2", b"during")
    # then one warning and no exception
    assert len(cache_warnings(caplog)) == 1 and tier.stats.available is False
    # when it restarts (AOF keeps the data) / then the tier is back once the
    # backoff lets a call try it again
    server.start()
    wait_until(lambda: tier.get("imgpipe:k") is not None, 60.0, "the tier to be back")
    assert tier.get("imgpipe:k") == b"before" and tier.stats.available is True
    warnings = cache_warnings(caplog)
    assert len(warnings) == 2 and "Redis tier back" in warnings[1]
    tier.close()


def test_tampered_entry_is_detected_deleted_and_counted(tier: RedisTier, raw: redis.Redis,
                                                        prefix: str) -> None:
    # given a tensor entry overwritten with garbage behind the cache's back
    cache = TieredCache([tier])
    key = tensor_key(prefix, image_digest(b"tampered"), SPEC)
    cache.put_tensor(key, tensor_for(1), SPEC)
    assert cache.flush(5)
    raw.set(key, b"garbage")
    # when it is read / then it is a miss, deleted from Redis and counted
    assert cache.get_tensor(key, SPEC) == (None, MISS)
    assert raw.exists(key) == 0
    assert cache.stats.corrupt == 1 and tier.stats.errors == 1
    cache.close()


def test_redis_hit_is_promoted_to_local(tier: RedisTier, prefix: str, tmp_path: Path) -> None:
    # given a tensor only in Redis (another host made it)
    local = LocalTier(tmp_path / "cache", max_bytes=64 << 20)
    cache = TieredCache([local, tier])
    key = tensor_key(prefix, image_digest(b"shared"), SPEC)
    tier.set(key, encode_tensor(tensor_for(2), SPEC))
    # when it is read twice, with the write-back flushed in between
    first = cache.get_tensor(key, SPEC)
    assert cache.flush(5)
    second = cache.get_tensor(key, SPEC)
    # then Redis served it first, the local disk after
    assert (first[1], second[1]) == ("redis", "local")
    assert first[0] is not None and second[0] is not None
    np.testing.assert_array_equal(second[0], tensor_for(2))
    assert cache.get_tensor(tensor_key(prefix, "0" * 32, SPEC), SPEC) == (None, MISS)
    cache.close()


def test_put_never_blocks_on_a_stalled_redis(redis_server_factory: Factory) -> None:
    # given a cache whose only tier is a Redis that stops answering (SIGSTOP),
    # its socket timeout far beyond the test's own limit
    server = redis_server_factory()
    tier = RedisTier(RedisSettings(url=server.url, timeout_s=600), "imgpipe", ttl_s=60,
                     max_entry_bytes=1 << 20, retry_interval_s=60)
    cache = TieredCache([tier], write_queue_items=4)
    blob = encode_tensor(tensor_for(3), SPEC)
    with server.paused():
        cache.put(tensor_key("imgpipe", image_digest(b"first"), SPEC), blob)
        # (the writer has taken that write off the queue: it is stuck in its SET
        # until the server answers again)
        wait_until(cache._queue.empty, 60.0, "the writer to take the first write")
        # when 20 more writes come, on a thread of their own
        accepted: list[bool] = []

        def put_all() -> None:
            for i in range(20):
                key = tensor_key("imgpipe", image_digest(bytes([i])), SPEC)
                accepted.append(cache.put(key, blob))

        putter = threading.Thread(target=put_all, daemon=True)
        putter.start()
        putter.join(60.0)
        # then all 20 returned while the writer was still stuck (none waited for
        # room): the queue took 4 and the other 16 were dropped and counted
        assert not putter.is_alive(), "a put waited for the stalled writer"
        assert accepted == [True] * 4 + [False] * 16 and cache.stats.dropped_writes == 16
    # and once the server answers again the queue drains
    assert cache.flush(60)
    assert tier.entry_count() == 5
    cache.close()


def test_verify_deletes_corrupt_redis_entries(tier: RedisTier, raw: redis.Redis,
                                              prefix: str) -> None:
    good = [tensor_key(prefix, image_digest(bytes([i])), SPEC) for i in range(3)]
    for key in good:
        tier.set(key, encode_tensor(tensor_for(4)[:, :8, :8], SPEC))
    raw.set(tensor_key(prefix, image_digest(b"bad"), SPEC), b"garbage")
    report = verify_tier(tier)
    assert (report.checked, report.corrupt) == (4, 1)
    assert sorted(tier.iter_keys()) == sorted(good)


# --- beside a job queue -------------------------------------------------------

def test_listing_and_clearing_skip_a_job_queue_under_the_same_prefix(
        tier: RedisTier, raw: redis.Redis, prefix: str) -> None:
    # given a job queue under the cache's prefix, cache entries, a reply stream a
    # client named like a cache key, and a string no cache wrote under the namespace
    add_job_queue(raw, prefix)
    entries = sorted(tensor_key(prefix, image_digest(bytes([i])), SPEC) for i in range(3))
    for key in entries:
        tier.set(key, encode_tensor(tensor_for(5)[:, :4, :4], SPEC))
    reply_stream = tensor_key(prefix, image_digest(b"reply"), SPEC)
    raw.xadd(reply_stream, {"job_id": "job-1"})
    raw.set(f"{prefix}:cache:notes", b"someone else's")
    # when the tier is counted, listed, verified and cleared
    counted, listed = tier.entry_count(), sorted(tier.iter_keys())
    report = verify_tier(tier)
    removed = tier.clear()
    # then it saw and removed its three entries, and nothing else was touched
    assert (counted, listed, report.checked, removed) == (3, entries, 3, 3)
    assert_job_queue_intact(raw, prefix)
    assert raw.xlen(reply_stream) == 1 and raw.get(f"{prefix}:cache:notes") is not None
    assert sorted(tier.streams_under([prefix])) == sorted(
        [reply_stream, *(f"{prefix}:{name}" for name in ("jobs", "results", "dead"))])
    raw.delete(*raw.keys(f"{prefix}:*"))


# --- signed entries -------------------------------------------------------------

SECRET = b"a secret only the fleet knows"
TOP2 = [{"label": "espresso", "index": 967, "score": 0.952457},
        {"label": "cup", "index": 968, "score": 0.021}]
FORGED = [{"label": "assault rifle", "index": 413, "score": 0.99},
          {"label": "cup", "index": 968, "score": 0.001}]


@pytest.fixture
def other_host(redis_server: RedisServer, prefix: str) -> RedisTier:
    """A second host's connection to the same Redis tier (closed by its cache)."""
    return RedisTier(redis_server.url, prefix, ttl_s=TTL_S, max_entry_bytes=1 << 20)


def result_key_for(prefix: str, image: bytes) -> str:
    return result_key(prefix, image_digest(image), "efficientnet_lite0", "w", 2,
                      spec_digest=SPEC, labels_digest="")


def test_a_forged_result_planted_in_redis_is_refused_with_the_hmac_key(
        tier: RedisTier, raw: redis.Redis, prefix: str, tmp_path: Path) -> None:
    # given a result entry written straight into the shared Redis, checksum valid
    key = result_key_for(prefix, b"coffee")
    raw.set(key, encode_result(FORGED))
    local = LocalTier(tmp_path / "local", max_bytes=64 << 20)
    # when a host holding the HMAC key looks the image up
    results = ResultCache(TieredCache([local, tier], secret=SECRET))
    answer = results.get(key, 2)
    assert results.cache.flush(5)
    # then the forgery is not served: a miss, deleted from Redis, counted, not copied
    assert answer == (None, MISS)
    assert raw.exists(key) == 0 and local.entry_count() == 0
    assert results.cache.stats.corrupt == 1 and tier.stats.errors == 1
    results.cache.close()


def test_without_the_hmac_key_a_forged_result_is_served(
        tier: RedisTier, raw: redis.Redis, prefix: str) -> None:
    # the threat the key answers: a valid checksum is all it takes
    key = result_key_for(prefix, b"coffee")
    raw.set(key, encode_result(FORGED))
    results = ResultCache(TieredCache([tier]))
    assert results.get(key, 2) == (FORGED, "redis")
    results.cache.close()
    raw.delete(key)


def test_signed_results_are_served_and_keep_their_signature_when_promoted(
        tier: RedisTier, other_host: RedisTier, raw: redis.Redis, prefix: str,
        tmp_path: Path) -> None:
    # given one host that wrote a result with the key
    key = result_key_for(prefix, b"coffee")
    writer = ResultCache(TieredCache([other_host], secret=SECRET))
    writer.put(key, TOP2)
    writer.cache.close()
    # when another host with the key and an empty local tier reads it twice
    local = LocalTier(tmp_path / "local", max_bytes=64 << 20)
    reader = ResultCache(TieredCache([local, tier], secret=SECRET))
    first = reader.get(key, 2)
    assert reader.cache.flush(5)
    second = reader.get(key, 2)
    # then Redis served it, then the local copy, signed as written
    assert (first, second) == ((TOP2, "redis"), (TOP2, "local"))
    assert local.get(key) == raw.get(key)
    # and a genuine entry copied under another image's key is refused there
    other = result_key_for(prefix, b"rifle")
    raw.set(other, raw.get(key))
    assert reader.get(other, 2) == (None, MISS) and raw.exists(other) == 0
    reader.cache.close()
    raw.delete(key)


def test_verify_with_the_hmac_key_removes_unsigned_and_forged_entries(
        tier: RedisTier, other_host: RedisTier, raw: redis.Redis, prefix: str) -> None:
    # given a signed entry, an unsigned one and one signed with another key
    genuine, unsigned, forged = (result_key_for(prefix, name) for name in (b"a", b"b", b"c"))
    writer = TieredCache([other_host], secret=SECRET)
    writer.put(genuine, encode_result(TOP2))
    writer.close()
    raw.set(unsigned, encode_result(FORGED))
    raw.set(forged, sign_entry(b"a guess", forged, encode_result(FORGED)))
    # when the tier is verified with the key / then only the signed entry is left
    report = verify_tier(tier, SECRET)
    assert (report.checked, report.corrupt) == (3, 2)
    assert list(tier.iter_keys()) == [genuine]
    raw.delete(genuine)
