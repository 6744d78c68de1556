"""The cache seen from `imgpipe score`: warm runs, the shared Redis tier, faults."""

from __future__ import annotations

import io
import os
import shutil
from pathlib import Path

import diskcache
import pytest
import redis
from PIL import Image

from pipeline.cache.codec import encode_result
from tests.integration.conftest import read_jsonl, start_imgpipe, wait_for_lines
from tests.integration.job_queue import add_job_queue, assert_job_queue_intact
from tests.redis_server import RedisServer

PHOTOS = ("coffee.jpg", "chelsea.jpg", "rocket.jpg", "camera.png")


@pytest.fixture
def photos(samples_dir: Path, tmp_path: Path) -> Path:
    folder = tmp_path / "photos"
    folder.mkdir()
    for name in PHOTOS:
        shutil.copy(samples_dir / name, folder / name)
    return folder


def _score(run, photos: Path, out: Path, *flags: str,
           env: dict[str, str] | None = None) -> dict[str, dict]:
    result = run("score", str(photos), "--out", str(out), *flags, env=env)
    assert result.returncode == 0, result.stderr
    return {Path(r["path"]).name: r for r in read_jsonl(out)}


def test_warm_runs_skip_decoding_and_inference(run, photos: Path, tmp_path: Path) -> None:
    # given a cold cache
    cache = ["--cache-dir", str(tmp_path / "cache")]
    cold = _score(run, photos, tmp_path / "cold.jsonl", *cache)
    # when the same directory is scored again, then with another top-k
    warm = _score(run, photos, tmp_path / "warm.jsonl", *cache)
    other_k = _score(run, photos, tmp_path / "k2.jsonl", *cache, "--topk", "2")
    # then the first run missed, the second reused predictions, the third tensors
    assert {r["cache"] for r in cold.values()} == {"miss"}
    assert {r["cache"] for r in warm.values()} == {"result:local"}
    assert {r["cache"] for r in other_k.values()} == {"tensor:local"}
    for name in PHOTOS:
        assert warm[name]["predictions"] == cold[name]["predictions"]
        assert other_k[name]["predictions"][0]["label"] == cold[name]["predictions"][0]["label"]


def test_the_summary_counts_every_process_lookups(run, photos: Path, tmp_path: Path) -> None:
    # given a warm cache
    cache = ["--cache-dir", str(tmp_path / "cache")]
    _score(run, photos, tmp_path / "cold.jsonl", *cache)
    # when the photos are scored again
    warm = run("score", str(photos), "--out", str(tmp_path / "warm.jsonl"), *cache)
    # then the workers' lookups are in the summary: per photo, its file entry and
    # its predictions were hits, and nothing missed
    assert f"cache tier local: {2 * len(PHOTOS)} hits, 0 misses, 0 errors" in warm.stderr


def test_the_same_bytes_under_another_name_hit(run, photos: Path, tmp_path: Path) -> None:
    cache = ["--cache-dir", str(tmp_path / "cache")]
    _score(run, photos, tmp_path / "first.jsonl", *cache)
    shutil.copy(photos / "coffee.jpg", photos / "renamed-coffee.jpg")
    again = _score(run, photos, tmp_path / "first.jsonl", *cache)
    assert again["renamed-coffee.jpg"]["cache"] == "result:local"


def test_hosts_share_the_redis_tier(run, photos: Path, tmp_path: Path,
                                    redis_server: RedisServer) -> None:
    # given one host that scored the photos with a shared Redis tier
    shared = ["--cache-redis-url", redis_server.url]
    _score(run, photos, tmp_path / "a.jsonl", "--cache-dir", str(tmp_path / "a"), *shared)
    # when another host, with an empty local cache, scores the same photos
    other = _score(run, photos, tmp_path / "b.jsonl", "--cache-dir", str(tmp_path / "b"), *shared)
    # then its answers come from Redis
    assert {r["cache"] for r in other.values()} == {"result:redis"}


def test_redis_down_at_start_costs_a_warning(run, photos: Path, tmp_path: Path) -> None:
    closed = RedisServer(tmp_path / "never-started")  # a free port nobody listens on
    result = run("score", str(photos), "--out", str(tmp_path / "r.jsonl"),
                 "--cache-dir", str(tmp_path / "c"), "--cache-redis-url", closed.url)
    assert result.returncode == 0, result.stderr
    records = read_jsonl(tmp_path / "r.jsonl")
    assert len(records) == len(PHOTOS) and all(r["status"] == "ok" for r in records)
    # the engine and every worker saw it; it is reported once
    warnings = [line for line in result.stderr.splitlines() if "Redis tier" in line]
    assert len(warnings) == 1, result.stderr


def test_redis_killed_mid_run_loses_nothing(samples_dir: Path, tmp_path: Path,
                                            redis_server_factory) -> None:
    # given a long run writing to a shared Redis tier
    server = redis_server_factory()
    photos = tmp_path / "many"
    photos.mkdir()
    for index in range(120):
        # Bytes after the image's end make every file a distinct cache entry.
        data = (samples_dir / PHOTOS[index % 4]).read_bytes() + index.to_bytes(4, "big")
        (photos / f"{index:03}-{PHOTOS[index % 4]}").write_bytes(data)
    out = tmp_path / "r.jsonl"
    scoring = start_imgpipe("score", str(photos), "--out", str(out), "--batch-size", "4",
                            "--cache-dir", str(tmp_path / "c"), "--cache-redis-url", server.url)
    # when Redis is killed part way through
    wait_for_lines(out, 1, scoring)
    server.stop(kill=True)
    _, stderr = scoring.communicate(timeout=300)
    # then the run completes and every image is scored
    assert scoring.returncode == 0, stderr
    records = read_jsonl(out)
    assert len(records) == 120 and all(r["status"] == "ok" for r in records)
    assert "Traceback" not in stderr
    outage = [line for line in stderr.splitlines() if "unavailable" in line]
    assert len(outage) == 1, stderr  # noticed by every process, reported once


def test_unwritable_cache_dir_only_warns(run, photos: Path, tmp_path: Path) -> None:
    blocker = tmp_path / "a-file"
    blocker.write_text("not a directory")
    result = run("score", str(photos), "--out", str(tmp_path / "r.jsonl"),
                 "--cache-dir", str(blocker / "cache"))
    assert result.returncode == 0, result.stderr
    assert all(r["status"] == "ok" for r in read_jsonl(tmp_path / "r.jsonl"))
    warnings = [line for line in result.stderr.splitlines() if "local cache disabled" in line]
    assert len(warnings) == 1 and "Traceback" not in result.stderr, result.stderr


def test_tampered_entries_are_detected_and_recomputed(run, photos: Path, tmp_path: Path) -> None:
    # given a warm cache whose every entry was overwritten on disk
    cache_dir = tmp_path / "cache"
    cold = _score(run, photos, tmp_path / "cold.jsonl", "--cache-dir", str(cache_dir))
    with diskcache.Cache(str(cache_dir)) as raw:
        for key in list(raw):
            raw[key] = b"IMGP" + b"\x00" * 64
    # when the photos are scored again
    again = _score(run, photos, tmp_path / "again.jsonl", "--cache-dir", str(cache_dir))
    # then nothing corrupt was used: everything was recomputed, with the same answers
    assert {r["cache"] for r in again.values()} == {"miss"}
    for name in PHOTOS:
        assert again[name]["predictions"] == cold[name]["predictions"]


def test_cache_command_reports_verifies_and_clears(run, photos: Path, tmp_path: Path) -> None:
    cache = ["--cache-dir", str(tmp_path / "cache")]
    _score(run, photos, tmp_path / "r.jsonl", *cache)
    stats = run("cache", "stats", *cache)
    assert stats.returncode == 0 and "local: 12 entries" in stats.stdout
    verify = run("cache", "verify", *cache)
    assert "checked 12, removed 0" in verify.stdout
    cleared = run("cache", "clear", *cache)
    assert "removed 12 entries" in cleared.stdout
    assert "local: 0 entries" in run("cache", "stats", *cache).stdout


def test_a_rewritten_file_is_never_served_stale(run, photos: Path, samples_dir: Path,
                                                tmp_path: Path) -> None:
    # given a warm cache, and then coffee.jpg rewritten with another photo of the
    # same size in bytes (padding after the JPEG's end), its mtime put back
    cache = ["--cache-dir", str(tmp_path / "cache")]
    _score(run, photos, tmp_path / "first.jsonl", *cache)
    target = photos / "coffee.jpg"
    before = target.stat()
    buffer = io.BytesIO()
    Image.open(samples_dir / "rocket.jpg").save(buffer, "JPEG", quality=60)
    assert buffer.tell() <= before.st_size
    target.write_bytes(buffer.getvalue().ljust(before.st_size, b"\0"))
    os.utime(target, ns=(before.st_atime_ns, before.st_mtime_ns))
    # when the directory is scored again
    again = _score(run, photos, tmp_path / "again.jsonl", *cache)
    # then the new content was read and scored, the unchanged files came from the cache
    assert again["coffee.jpg"]["cache"] == "miss"
    assert again["coffee.jpg"]["predictions"][0]["label"] != "espresso"
    assert again["chelsea.jpg"]["cache"] == "result:local"


def test_cache_clear_beside_a_job_queue_refuses_then_removes_only_cache_entries(
        run, photos: Path, tmp_path: Path, redis_server_factory) -> None:
    # given a Redis that carries both the shared cache and the job queue, with
    # the default prefixes (both "imgpipe")
    server = redis_server_factory()
    cache = ["--cache-dir", str(tmp_path / "cache"), "--cache-redis-url", server.url]
    _score(run, photos, tmp_path / "r.jsonl", *cache)
    raw = redis.Redis.from_url(server.url)
    add_job_queue(raw, "imgpipe")
    # when its cache is counted / then only the cache entries count
    assert "redis: 8 entries" in run("cache", "stats", *cache).stdout  # tensors and results
    # when it is cleared without --yes / then it refuses in one line, touching nothing
    refused = run("cache", "clear", *cache)
    assert refused.returncode == 2 and refused.stdout == ""
    assert refused.stderr.count("\n") == 1 and "imgpipe:jobs" in refused.stderr
    assert "--yes" in refused.stderr
    stats = run("cache", "stats", *cache).stdout
    assert "local: 12 entries" in stats and "redis: 8 entries" in stats
    # when it is cleared with --yes / then the cache is gone and the queue intact
    cleared = run("cache", "clear", "--yes", *cache)
    assert cleared.returncode == 0 and "redis: removed 8 entries" in cleared.stdout
    assert_job_queue_intact(raw, "imgpipe")
    assert "redis: 0 entries" in run("cache", "stats", *cache).stdout
    raw.close()


FORGED = [{"label": "assault rifle", "index": 413, "score": 0.99}] + [
    {"label": f"class {index}", "index": index, "score": 0.001} for index in range(4)]


def test_forged_predictions_in_a_shared_redis_are_not_served_with_an_hmac_key(
        run, photos: Path, tmp_path: Path, redis_server_factory) -> None:
    # given hosts sharing a Redis tier and an HMAC key, and one that scored the photos
    server = redis_server_factory()
    key_file = tmp_path / "cache.key"
    key_file.write_text("a secret only the fleet knows\n")
    signed = {"IMGPIPE_CACHE__HMAC_KEY_FILE": str(key_file)}
    shared = ["--cache-redis-url", server.url]
    first = _score(run, photos, tmp_path / "a.jsonl", "--cache-dir", str(tmp_path / "a"),
                   *shared, env=signed)
    # when someone with write access to Redis replaces every cached result with a
    # forgery whose checksum is valid
    raw = redis.Redis.from_url(server.url)
    forge_results(raw)
    # then another host with the key does not serve them: it scores from the
    # (genuine, signed) tensors, with the real predictions
    other = _score(run, photos, tmp_path / "b.jsonl", "--cache-dir", str(tmp_path / "b"),
                   *shared, env=signed)
    assert {r["cache"] for r in other.values()} == {"tensor:redis"}
    for name in PHOTOS:
        assert other[name]["predictions"] == first[name]["predictions"]
    # and `cache verify` with the key removes forgeries planted again
    forge_results(raw)
    verify = run("cache", "verify", "--cache-dir", str(tmp_path / "b"), *shared, env=signed)
    assert "redis: checked 8, removed 4 corrupt entries" in verify.stdout
    raw.close()


def forge_results(raw: redis.Redis) -> None:
    """Overwrite every cached result in Redis with FORGED, unsigned."""
    keys = list(raw.scan_iter(match="imgpipe:cache:r:*"))
    assert len(keys) == len(PHOTOS)
    for key in keys:
        raw.set(key, encode_result(FORGED))


def test_an_unreadable_hmac_key_file_stops_cache_commands_in_one_line(
        run, tmp_path: Path) -> None:
    missing = {"IMGPIPE_CACHE__HMAC_KEY_FILE": str(tmp_path / "no-such.key")}
    result = run("cache", "stats", "--cache-dir", str(tmp_path / "cache"), env=missing)
    assert result.returncode == 2 and result.stderr.count("\n") == 1
    assert "cache.hmac_key_file" in result.stderr and "Traceback" not in result.stderr
