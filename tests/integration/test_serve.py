"""`imgpipe serve` end to end: jobs in through Redis, results out, bad jobs answered.

A real redis-server (started by the suite on a free port) and the real daemon
in a subprocess; each test has its own key prefix.
"""

from __future__ import annotations

import os
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from pipeline.config import RedisSettings, load_settings
from pipeline.errors import InputError
from pipeline.preprocess.pillow import PillowBackend
from pipeline.transport import contract
from pipeline.transport.client import Client
from tests.builders import damaged_copies
from tests.integration.conftest import read_jsonl
from tests.redis_server import RedisServer
from tests.serve_daemon import DaemonFactory, ServeProcess, wait_until

pytestmark = pytest.mark.slow




@pytest.fixture
def client(redis_server: RedisServer, prefix: str) -> Iterator[Client]:
    with Client(RedisSettings(url=redis_server.url, prefix=prefix)) as made:
        yield made


def serve_env(redis_server: RedisServer, prefix: str, roots: list[Path],
              **settings: str) -> dict[str, str]:
    env = {"IMGPIPE_REDIS_URL": redis_server.url, "IMGPIPE_REDIS__PREFIX": prefix,
           "IMGPIPE_SERVE__ALLOWED_ROOTS": os.pathsep.join(map(str, roots)),
           "IMGPIPE_PREPROCESS__WORKERS": "1"}
    env.update({f"IMGPIPE_{key.upper()}": value for key, value in settings.items()})
    return env


@pytest.fixture(scope="module")
def efficientnet_daemon(redis_server: RedisServer, samples_dir: Path,
                        tmp_path_factory: pytest.TempPathFactory) -> Iterator[ServeProcess]:
    """The default model, serving the prefix "serve-e2e" for this module's tests."""
    log = tmp_path_factory.mktemp("serve") / "serve.log"
    daemon = ServeProcess(serve_env(redis_server, "serve-e2e", [samples_dir],
                                    CACHE__ENABLED="false"), log)
    daemon.start()
    yield daemon
    daemon.close()


@pytest.fixture
def e2e(redis_server: RedisServer) -> Iterator[Client]:
    with Client(RedisSettings(url=redis_server.url, prefix="serve-e2e")) as made:
        yield made


def ask(client: Client, timeout_s: float = 60.0, **job: Any) -> dict[str, Any]:
    """Submit one job to a private reply stream and wait for its result."""
    reply = client.reply_stream()
    job_id = client.submit(reply_to=reply, **job)
    results = client.wait([job_id], stream=reply, timeout_s=timeout_s)
    client.delete_stream(reply)
    assert job_id in results, f"no result for {job}"
    return results[job_id]


def test_path_and_data_jobs_score_like_imgpipe_score(efficientnet_daemon: ServeProcess,
                                                     e2e: Client, samples_dir: Path,
                                                     run: Any, tmp_path: Path) -> None:
    out = tmp_path / "score.jsonl"
    scored = run("score", str(samples_dir), "--out", str(out), "--no-cache")
    assert scored.returncode == 0, scored.stderr
    expected = {Path(r["path"]).name: r["predictions"] for r in read_jsonl(out)}
    for name, predictions in expected.items():
        by_path = ask(e2e, image=str(samples_dir / name))
        by_data = ask(e2e, data=(samples_dir / name).read_bytes())
        for result in (by_path, by_data):
            assert result["status"] == "ok", result
            assert result["model"] == "efficientnet_lite0"
            assert [p["index"] for p in result["predictions"]] == \
                [p["index"] for p in predictions]
            assert result["cache"] == "miss"
            assert set(result["timings_ms"]) == {"queue_wait", "cache_lookup", "decode",
                                                  "preprocess", "h2d", "inference"}


def test_job_options_topk_id_relative_path_and_deadline(efficientnet_daemon: ServeProcess,
                                                        e2e: Client) -> None:
    result = ask(e2e, image="coffee.jpg", topk=2, job_id="my-own-id")  # relative to the root
    assert result["job_id"] == "my-own-id"
    assert result["status"] == "ok" and len(result["predictions"]) == 2
    assert result["predictions"][0]["label"] == "espresso"

    late = ask(e2e, image="coffee.jpg", deadline_ms=int(time.time() * 1000) - 1)
    assert late["status"] == "expired"
    assert late["error"]["code"] == contract.EXPIRED
    assert "preprocess" not in late["timings_ms"]  # never decoded


def bad_jobs(samples_dir: Path, outside: Path) -> list[tuple[dict[bytes, bytes], str, str]]:
    """(fields, expected error code, a word the message must contain)."""
    photo = (samples_dir / "chelsea.jpg").read_bytes()
    escape = os.path.relpath(outside, samples_dir).encode()
    jobs: list[tuple[dict[bytes, bytes], str, str]] = [
        ({b"id": b"x"}, "missing_field", "image"),
        ({b"image": b"coffee.jpg", b"data": photo}, "conflicting_fields", "data"),
        ({b"image": b"coffee.jpg", b"colour": b"red"}, "unknown_field", "colour"),
        ({b"image": b"coffee.jpg", b"\xff\xfe": b"1"}, "invalid_field", "UTF-8"),
        ({b"image": b"\xff\xfe\xfd"}, "invalid_field", "image"),
        ({b"image": b"coffee.jpg", b"topk": b"-1"}, "invalid_field", "topk"),
        ({b"image": b"coffee.jpg", b"topk": b"1000000"}, "invalid_field", "topk"),
        ({b"image": b"coffee.jpg", b"topk": b"five"}, "invalid_field", "topk"),
        ({b"image": b"coffee.jpg", b"deadline_ms": b"soon"}, "invalid_field", "deadline_ms"),
        ({b"image": b"coffee.jpg", b"model": b"resnet9000"}, "unknown_model", "resnet9000"),
        ({b"image": b"coffee.jpg", b"v": b"2"}, "unsupported_version", "version"),
        ({b"image": b"coffee.jpg", b"reply_to": b"no spaces please"}, "invalid_field",
         "reply_to"),
        ({b"image": b"/etc/passwd"}, "path_not_allowed", "outside"),
        ({b"image": b"../../../../../etc/passwd"}, "path_not_allowed", "outside"),
        ({b"image": escape}, "path_not_allowed", "outside"),
        ({b"image": b"link-out.jpg"}, "path_not_allowed", "outside"),
        ({b"image": b"coffee.jpg\x00.png"}, "path_not_allowed", "NUL"),
        ({b"image": b"missing.jpg"}, "not_found", "exist"),
        ({b"data": b""}, "empty_file", "empty"),
        ({b"data": os.urandom(4096)}, "not_an_image", "image"),
        ({b"data": b"\x89PNG\r\n\x1a\n" + os.urandom(64)}, "not_an_image", "recognised"),
        ({b"data": photo[: len(photo) // 3]}, "truncated", "truncated"),
        ({b"data": b"x" * (2 * 1024 * 1024 + 1)}, "data_too_large", "limit"),
    ]
    return jobs


def test_malformed_and_poison_jobs_get_error_results(
        daemon_factory: DaemonFactory, redis_server: RedisServer, raw: redis.Redis,
        client: Client, prefix: str, samples_dir: Path, tmp_path: Path,
        tiny_model: Path) -> None:
    root = tmp_path / "root"
    root.mkdir()
    for sample in samples_dir.iterdir():
        (root / sample.name).write_bytes(sample.read_bytes())
    outside = tmp_path / "outside.jpg"
    outside.write_bytes((samples_dir / "coffee.jpg").read_bytes())
    (root / "link-out.jpg").symlink_to(outside)
    daemon_factory(serve_env(redis_server, prefix, [root], MODEL__NAME=str(tiny_model),
                             SERVE__MAX_INLINE_BYTES=str(2 * 1024 * 1024)))
    cases = bad_jobs(root, outside)
    damaged = damaged_copies((samples_dir / "chelsea.jpg").read_bytes(), count=20)
    jobs = raw.pipeline()
    for fields, _, _ in cases:
        jobs.xadd(f"{prefix}:jobs", fields)
    for data in damaged:
        jobs.xadd(f"{prefix}:jobs", {b"data": data})
    jobs.xadd(f"{prefix}:jobs", {b"image": b"coffee.jpg", b"id": b"good"})
    ids = [entry.decode() for entry in jobs.execute()]

    results = _results_by_entry(raw, f"{prefix}:results", len(ids))
    for entry_id, (_, code, word) in zip(ids, cases, strict=False):
        result = results[entry_id]
        assert result["status"] == "error", result
        assert result["error"]["code"] == code, (code, result)
        assert word in result["error"]["message"], result
    # damaged copies: each answered as its bytes deserve, an image error (the one
    # the preprocessing itself gives them here) or predictions
    settings = load_settings()
    backend = PillowBackend(settings.preprocess.spec(), settings.preprocess.limits())
    for entry_id, data in zip(ids[len(cases):-1], damaged, strict=True):
        result, expected = results[entry_id], backend.run_one(data)
        if isinstance(expected, InputError):
            assert result["status"] == "error", result
            assert result["error"]["code"] == expected.code, (expected, result)
        else:
            assert result["status"] == "ok", (result, expected.shape)
            assert len(result["predictions"]) == settings.model.topk, result
    assert results[ids[-1]]["status"] == "ok"
    assert raw.xlen(f"{prefix}:jobs") == 0
    assert raw.xpending(f"{prefix}:jobs", "imgpipe")["pending"] == 0


def test_a_reply_stream_that_refuses_results_falls_back_to_the_default_one(
        daemon_factory: DaemonFactory, redis_server: RedisServer, raw: redis.Redis,
        prefix: str, samples_dir: Path, tiny_model: Path) -> None:
    daemon_factory(serve_env(redis_server, prefix, [samples_dir], MODEL__NAME=str(tiny_model)))
    raw.set(f"{prefix}:not-a-stream", "a string")
    entry = raw.xadd(f"{prefix}:jobs", {"image": "coffee.jpg", "reply_to":
                                        f"{prefix}:not-a-stream"}).decode()
    result = _results_by_entry(raw, f"{prefix}:results", 1)[entry]
    assert result["error"]["code"] == "reply_failed"
    assert result["reply_to"] == f"{prefix}:not-a-stream"
    assert raw.xlen(f"{prefix}:jobs") == 0


def _results_by_entry(raw: redis.Redis, stream: str, count: int,
                      timeout_s: float = 120.0) -> dict[str, dict[str, Any]]:
    """Wait for `count` results on `stream`; each decoded, by the job's entry id."""
    wait_until(lambda: raw.xlen(stream) >= count, timeout_s, f"{count} results on {stream}")
    entries = raw.xrange(stream)
    assert len(entries) == count, f"{len(entries)} results of {count}"
    results = [contract.decode_result(fields) for _, fields in entries]
    return {result["entry_id"]: result for result in results}


def test_a_consumer_group_that_vanishes_is_created_again(
        daemon_factory: DaemonFactory, redis_server: RedisServer, raw: redis.Redis,
        prefix: str, samples_dir: Path, tiny_model: Path) -> None:
    # given a serving daemon whose group is destroyed (as a Redis restart without data would)
    daemon = daemon_factory(serve_env(redis_server, prefix, [samples_dir],
                                      MODEL__NAME=str(tiny_model)))
    raw.xgroup_destroy(f"{prefix}:jobs", "imgpipe")

    # when a job comes
    daemon.wait_for_log("creating it again")
    entry = raw.xadd(f"{prefix}:jobs", {"image": "coffee.jpg"}).decode()

    # then it is answered
    assert _results_by_entry(raw, f"{prefix}:results", 1)[entry]["status"] == "ok"
