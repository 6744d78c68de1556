"""pipeline.transport.client against a real redis-server (never :6379).

The daemon is not part of this test: `Daemon` plays its side of the wire
contract with raw commands (XREADGROUP, a result via contract.result_fields,
XACK + XDEL in one MULTI; dead letters by XADD).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import os
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
import redis

from pipeline.config import RedisSettings
from pipeline.errors import ConfigError, TransientError
from pipeline.transport import contract, dead_letters
from pipeline.transport.client import Client, Consumer
from tests.redis_server import RedisServer
from tests.serve_daemon import wait_until

GROUP = "workers"
MODEL = "mean_colour"
ALL_BYTES = bytes(range(256)) * 3 + b"\r\n\0"  # every byte value, CRLF and NUL included



@pytest.fixture
def keys(prefix: str) -> contract.Keys:
    return contract.Keys(prefix)



@pytest.fixture
def client(redis_server: RedisServer, prefix: str) -> Iterator[Client]:
    with Client(RedisSettings(url=redis_server.url, prefix=prefix, timeout_s=2), GROUP) as made:
        yield made


class Daemon:
    """The daemon's side of the contract, by hand, as consumer `name`."""

    def __init__(self, raw: redis.Redis, keys: contract.Keys, roots: list[str],
                 name: str = "daemon-1") -> None:
        self.raw, self.keys, self.name = raw, keys, name
        self.rules = contract.JobRules(MODEL, max_topk=20, max_inline_bytes=1 << 20,
                                   allowed_roots=roots, default_reply_to=keys.results)
        with contextlib.suppress(redis.ResponseError):  # BUSYGROUP: made already
            raw.xgroup_create(keys.jobs, GROUP, id="0", mkstream=True)

    def read(self, count: int) -> list[tuple[bytes, dict[bytes, bytes]]]:
        """Deliver up to `count` jobs to this consumer (they become pending)."""
        reply: Any = self.raw.xreadgroup(GROUP, self.name, {self.keys.jobs: ">"}, count=count)
        return list(reply[0][1]) if reply else []

    def finish(self, entry_id: bytes, fields: dict[bytes, bytes]) -> None:
        """Write the job's result, then XACK and XDEL it, all in one MULTI."""
        job = contract.parse_job(entry_id.decode(), fields, self.rules,
                                 now_ms=int(time.time() * 1000))
        record: dict[str, Any] = {"status": "ok", "timings_ms": {"infer": 2.5},
                                  "predictions": [{"label": "cat", "index": 3, "score": 0.9}]}
        if job.error is not None:
            record = {"status": "error",
                      "error": {"code": job.error.code, "message": job.error.message}}
        with self.raw.pipeline(transaction=True) as pipe:
            pipe.xadd(job.reply_to, contract.result_fields(record, job, MODEL, 1.0))  # type: ignore[arg-type]
            pipe.xack(self.keys.jobs, GROUP, entry_id)
            pipe.xdel(self.keys.jobs, entry_id)
            pipe.execute()

    def serve(self, count: int) -> int:
        jobs = self.read(count)
        for entry_id, fields in jobs:
            self.finish(entry_id, fields)
        return len(jobs)


@pytest.fixture
def daemon(raw: redis.Redis, keys: contract.Keys, tmp_path: Path) -> Daemon:
    return Daemon(raw, keys, [os.path.realpath(tmp_path)])


def jobs_in(raw: redis.Redis, keys: contract.Keys) -> list[dict[bytes, bytes]]:
    entries: Any = raw.xrange(keys.jobs)
    return [fields for _, fields in entries]


def dead_letter(raw: redis.Redis, keys: contract.Keys, job: dict[str, Any], n: int) -> str:
    """XADD a dead letter as the daemon would: the job's fields plus DEAD_FIELDS."""
    fields = {**contract.job_fields(**job), "error": json.dumps({"code": "worker_crashed",
                                                             "message": f"crash {n}"}),
              "deliveries": "3", "entry_id": f"1-{n}"}
    return raw.xadd(keys.dead, fields).decode()  # type: ignore[arg-type,union-attr]


# -- submit -------------------------------------------------------------------

def test_submit_writes_jobs_the_daemon_parses(client: Client, raw: redis.Redis,
                                              keys: contract.Keys, daemon: Daemon,
                                              tmp_path: Path) -> None:
    # given an image file under the daemon's allowed roots
    image = tmp_path / "cat.jpg"
    image.write_bytes(b"not really a jpeg")
    # when a path job (every option) and a data job are submitted
    first = client.submit(str(image), job_id="job-a", topk=3, reply_to=f"{keys.prefix}:mine",
                          deadline_ms=2**62, model=MODEL)
    second = client.submit(data=ALL_BYTES)
    # then the ids are the caller's or a fresh uuid hex, and the fields follow the contract
    assert first == "job-a" and len(second) == 32 and int(second, 16) >= 0
    path_fields, data_fields = jobs_in(raw, keys)
    assert path_fields == {b"v": b"1", b"image": str(image).encode(), b"id": b"job-a",
                           b"topk": b"3", b"reply_to": f"{keys.prefix}:mine".encode(),
                           b"deadline_ms": str(2**62).encode(), b"model": MODEL.encode()}
    assert data_fields == {b"v": b"1", b"data": ALL_BYTES, b"id": second.encode()}
    now_ms = int(time.time() * 1000)
    path_job = contract.parse_job("1-0", path_fields, daemon.rules, now_ms)
    data_job = contract.parse_job("1-1", data_fields, daemon.rules, now_ms)
    assert path_job.error is None and path_job.image == os.path.realpath(image)
    assert (path_job.job_id, path_job.topk, path_job.reply_to) == ("job-a", 3,
                                                                   f"{keys.prefix}:mine")
    assert data_job.error is None and data_job.data == ALL_BYTES and data_job.job_id == second


def test_submit_needs_exactly_one_of_image_and_data(client: Client) -> None:
    with pytest.raises(ValueError):
        client.submit()
    with pytest.raises(ValueError):
        client.submit("a.jpg", b"bytes")


def test_submit_many_sends_chunk_by_chunk(client: Client, raw: redis.Redis,
                                          keys: contract.Keys) -> None:
    # given a generator of 1,201 jobs that notes how many were queued when it got to #600
    queued_at_600: list[int] = []

    def jobs() -> Iterator[dict[str, Any]]:
        for n in range(1201):
            if n == 600:
                queued_at_600.append(raw.xlen(keys.jobs))
            yield {"data": n.to_bytes(2, "big") + ALL_BYTES} if n % 2 else {"image": f"{n}.jpg"}
        yield {"image": "named.jpg", "job_id": "named", "topk": 2}

    # when they are submitted in chunks of 500
    ids = client.submit_many(jobs(), chunk=500)
    # then the first chunk was sent before the generator went on, nothing was held back,
    # and every job is queued in order under a unique id
    assert queued_at_600 == [500]
    assert len(ids) == len(set(ids)) == 1202 and ids[-1] == "named"
    queued = jobs_in(raw, keys)
    assert [f[b"id"].decode() for f in queued] == ids
    assert queued[1][b"data"] == (1).to_bytes(2, "big") + ALL_BYTES
    assert queued[0] == {b"v": b"1", b"image": b"0.jpg", b"id": ids[0].encode()}
    assert queued[-1] == {b"v": b"1", b"image": b"named.jpg", b"id": b"named", b"topk": b"2"}


# -- results ------------------------------------------------------------------

def blocked_readers(raw: redis.Redis) -> int:
    """Connections to the server blocked in an XREAD (a Client.wait waiting)."""
    return sum(1 for conn in raw.client_list() if conn["cmd"] == "xread" and "b" in conn["flags"])


class Waiting:
    """Client.wait(...) on a thread of its own; result() joins it."""

    def __init__(self, client: Client, job_ids: list[str], **options: Any) -> None:
        self.got: Optional[dict[str, dict[str, Any]]] = None
        self._thread = threading.Thread(target=self._wait, args=(client, job_ids, options),
                                        daemon=True)
        self._thread.start()

    def _wait(self, client: Client, job_ids: list[str], options: dict[str, Any]) -> None:
        self.got = client.wait(job_ids, **options)

    def result(self, within_s: float) -> dict[str, dict[str, Any]]:
        """What wait returned; fails if it has not returned within `within_s`."""
        self._thread.join(within_s)
        assert not self._thread.is_alive() and self.got is not None, \
            f"wait did not return within {within_s} s"
        return self.got


def test_wait_collects_only_its_own_results(client: Client, daemon: Daemon,
                                            raw: redis.Redis, keys: contract.Keys) -> None:
    # given three jobs replying to a private stream, and a stranger's result in it
    stream = client.reply_stream()
    assert stream.startswith(keys.results + ":") and stream != client.reply_stream()
    ids = [client.submit(data=b"x", reply_to=stream) for _ in range(3)]
    raw.xadd(stream, {"v": "1", "job_id": "someone-else", "status": "ok"})
    # when the daemon finishes two of them: one before the wait, one while it
    # blocks (its timeout far beyond the test's own limit)
    daemon.serve(1)
    waiting = Waiting(client, ids[:2], stream=stream, timeout_s=3600)
    wait_until(lambda: blocked_readers(raw) == 1, 60, "the wait to block on its stream")
    daemon.serve(1)
    # then the wait returns as soon as it has both, decoded, and nothing else
    got = waiting.result(within_s=60)
    assert set(got) == set(ids[:2])
    for job_id, result in got.items():
        assert result["job_id"] == job_id and result["status"] == "ok"
        assert result["predictions"] == [{"label": "cat", "index": 3, "score": 0.9}]
        assert result["timings_ms"] == {"queue_wait": 1.0, "infer": 2.5}
    # and a wait for all three ends at its timeout, not before, with the two
    started = time.monotonic()
    assert set(client.wait(ids, stream=stream, timeout_s=1.0)) == set(ids[:2])
    assert time.monotonic() - started >= 1.0
    # and once the last one is done, a wait returns all three
    daemon.serve(1)
    assert set(Waiting(client, ids, stream=stream, timeout_s=3600).result(60)) == set(ids)
    client.delete_stream(stream)
    assert raw.exists(stream) == 0


def test_wait_with_nothing_to_come_times_out_empty(client: Client) -> None:
    # a wait for jobs that never finish ends at its timeout, empty
    started = time.monotonic()
    assert client.wait(["nope"], stream=client.reply_stream(), timeout_s=0.2) == {}
    assert time.monotonic() - started >= 0.2
    # and a wait for no jobs at all returns at once, long before its timeout
    assert Waiting(client, [], stream=client.reply_stream(), timeout_s=3600).result(60) == {}


def test_a_reply_stream_with_a_ttl_exists_empty_and_expires(client: Client, daemon: Daemon,
                                                           raw: redis.Redis) -> None:
    # given a reply stream made with a time to live
    stream = client.reply_stream(ttl_s=60)
    # then it exists at once, holds nothing a reader would see, and expires
    assert raw.type(stream) == b"stream" and raw.xlen(stream) == 0
    assert 0 < raw.ttl(stream) <= 60
    assert client.wait(["nope"], stream=stream, timeout_s=0.1) == {}
    # and a result written into it keeps the expiry, which keep_stream pushes back
    job = client.submit(data=b"x", reply_to=stream)
    daemon.serve(1)
    assert set(client.wait([job], stream=stream, timeout_s=5)) == {job}
    assert 0 < raw.ttl(stream) <= 60
    client.keep_stream(stream, 3600)
    assert 60 < raw.ttl(stream) <= 3600
    client.delete_stream(stream)
    assert raw.exists(stream) == 0


def test_results_follows_the_stream(client: Client, daemon: Daemon, keys: contract.Keys) -> None:
    # given two finished jobs on the default result stream
    first = [client.submit(image="/elsewhere/a.jpg"), client.submit(data=b"y")]
    daemon.serve(2)
    stream = client.results(block_ms=50, count=1)
    # when the follower has read them, and a third job finishes while it blocks
    seen = list(itertools.islice(stream, 2))
    third = client.submit(data=b"z")

    def finish_once_blocked() -> None:
        wait_until(lambda: blocked_readers(daemon.raw) == 1, 60, "the follower to block")
        daemon.serve(1)

    finisher = threading.Thread(target=finish_once_blocked)
    finisher.start()
    seen.append(next(stream))
    finisher.join(60)
    assert not finisher.is_alive()
    stream.close()
    # then every result arrives once, in order, decoded; a path outside the roots is an error
    assert [result["job_id"] for _, result in seen] == [*first, third]
    assert seen[0][1]["status"] == "error" and seen[0][1]["error"]["code"] == "path_not_allowed"
    assert seen[1][1]["status"] == "ok" and seen[1][1]["cache"] == "miss"
    # and `after` resumes behind a given entry
    resumed = next(client.results(keys.results, after=seen[1][0]))
    assert resumed == seen[2]


# -- status -------------------------------------------------------------------

def test_status_on_an_empty_redis(client: Client) -> None:
    status = client.status()
    assert (status.jobs, status.pending, status.lag, status.dead, status.results) == (0,) * 5
    assert not status.group_exists and status.consumers == [] and status.group == GROUP


def test_status_before_the_group_exists(client: Client) -> None:
    client.submit_many([{"data": b"a"}, {"data": b"b"}])
    status = client.status()
    assert not status.group_exists
    assert (status.jobs, status.pending, status.lag) == (2, 0, 2)


def test_status_counts_the_queue(client: Client, raw: redis.Redis, keys: contract.Keys,
                                 daemon: Daemon) -> None:
    # given 6 jobs: 2 delivered to daemon-1 (1 of them finished), 4 never delivered
    client.submit_many({"data": bytes([n])} for n in range(6))
    delivered = daemon.read(2)
    daemon.finish(*delivered[0])
    raw.xgroup_createconsumer(keys.jobs, GROUP, "daemon-2")
    dead_letter(raw, keys, {"data": b"bad"}, 1)
    # when the status is read
    status = client.status()
    # then it counts jobs in the stream, pending, lag, dead letters and results
    assert status.group_exists
    assert (status.jobs, status.pending, status.lag, status.dead, status.results) == (5, 1, 4,
                                                                                      1, 1)
    assert [(c.name, c.pending) for c in status.consumers] == [("daemon-1", 1), ("daemon-2", 0)]
    assert all(isinstance(c, Consumer) and 0 <= c.idle_ms < 60_000 for c in status.consumers)
    # and when an undelivered job is deleted Redis cannot count the lag: it is derived
    newest: Any = raw.xrevrange(keys.jobs, count=1)
    raw.xdel(keys.jobs, newest[0][0])
    groups: Any = raw.xinfo_groups(keys.jobs)
    assert groups[0]["lag"] is None
    assert (client.status().jobs, client.status().lag) == (4, 3)


# -- dead letters -------------------------------------------------------------

def test_dead_list_is_readable(client: Client, raw: redis.Redis, keys: contract.Keys) -> None:
    first = dead_letter(raw, keys, {"data": ALL_BYTES, "job_id": "j1"}, 1)
    dead_letter(raw, keys, {"image": "a.jpg", "job_id": "j2", "topk": 4}, 2)
    listed = client.dead_list()
    assert listed[0] == (first, {"v": "1", "data": f"<{len(ALL_BYTES)} bytes>", "id": "j1",
                                 "error": {"code": "worker_crashed", "message": "crash 1"},
                                 "deliveries": 3, "entry_id": "1-1"})
    assert listed[1][1]["image"] == "a.jpg" and listed[1][1]["topk"] == "4"
    assert [entry_id for entry_id, _ in client.dead_list(count=1)] == [first]


def test_dead_retry_moves_letters_back_once(client: Client, raw: redis.Redis,
                                           keys: contract.Keys,
                                           monkeypatch: pytest.MonkeyPatch) -> None:
    # given 10 dead letters, read back 3 per page
    monkeypatch.setattr(dead_letters, "DEAD_PAGE", 3)
    jobs: list[dict[str, Any]] = [{"data": ALL_BYTES + bytes([n]), "job_id": f"j{n}", "topk": 2}
                                  for n in range(10)]
    ids = [dead_letter(raw, keys, job, n) for n, job in enumerate(jobs)]
    # when one is retried by id (twice, and an unknown id), then all the rest
    assert client.dead_retry([ids[4], ids[4], "1-1"]) == 1
    assert raw.xlen(keys.dead) == 9
    with pytest.raises(ValueError, match="'nope'"):
        client.dead_retry([ids[5], "nope"])
    assert client.dead_retry() == 9
    # then each is a job again exactly once, its original fields only, bytes intact
    order = [4, 0, 1, 2, 3, 5, 6, 7, 8, 9]
    assert jobs_in(raw, keys) == [
        {k.encode(): v if isinstance(v, bytes) else v.encode()
         for k, v in contract.job_fields(**jobs[n]).items()} for n in order]
    assert raw.xlen(keys.dead) == 0 and client.dead_retry() == 0


def test_dead_purge_empties_the_dead_letters(client: Client, raw: redis.Redis,
                                            keys: contract.Keys) -> None:
    for n in range(3):
        dead_letter(raw, keys, {"image": f"{n}.jpg"}, n)
    assert client.dead_purge() == 3
    assert raw.xlen(keys.dead) == 0 and client.dead_list() == []
    assert client.dead_purge() == 0


def test_a_key_of_another_type_under_the_prefix_is_one_line_and_kept(
        client: Client, raw: redis.Redis, keys: contract.Keys) -> None:
    # given keys under the prefix that are not streams
    raw.set(keys.jobs, "someone else's")
    raw.set(keys.dead, "someone else's")
    # when each command meets them
    calls: list[Callable[[], object]] = [
        lambda: client.submit(data=ALL_BYTES), lambda: client.submit_many([{"data": ALL_BYTES}]),
        client.status, client.dead_list, client.dead_retry, client.dead_purge]
    for call in calls:
        with pytest.raises(ConfigError) as raised:
            call()
        # then a one-line error names the prefix, without the command's bytes
        message = str(raised.value)
        assert f"prefix {keys.prefix!r} is not a stream" in message
        assert "\n" not in message and "Command #" not in message
    # and nothing was deleted
    assert raw.get(keys.jobs) == raw.get(keys.dead) == b"someone else's"


# -- outages ------------------------------------------------------------------

def down_client(server: RedisServer) -> Client:
    url = f"redis://:hunter2@127.0.0.1:{server.port}/0"  # the password must never show
    return Client(RedisSettings(url=url, prefix="t-down", timeout_s=0.5), GROUP)


def assert_transient(call: Callable[[], object], port: int, within_s: float) -> None:
    started = time.monotonic()
    with pytest.raises(TransientError) as raised:
        call()
    assert time.monotonic() - started < within_s
    message = str(raised.value)
    assert f"127.0.0.1:{port}" in message
    assert "hunter2" not in message and "redis://" not in message


def test_a_stopped_server_is_a_transient_error(
        redis_server_factory: Callable[[], RedisServer]) -> None:
    server = redis_server_factory()
    server.stop()
    with down_client(server) as client:
        assert_transient(lambda: client.submit(data=b"x"), server.port, 1.0)
        assert_transient(lambda: client.submit_many([{"data": b"x"}]), server.port, 1.0)
        assert_transient(client.status, server.port, 1.0)
        assert_transient(lambda: next(client.results(block_ms=100)), server.port, 1.0)
        assert_transient(lambda: client.wait(["a"], stream="s", timeout_s=5), server.port, 1.0)
        assert_transient(client.dead_retry, server.port, 1.0)
        assert_transient(client.dead_purge, server.port, 1.0)


def test_a_hung_server_is_a_transient_error_after_the_timeout(
        redis_server_factory: Callable[[], RedisServer]) -> None:
    server = redis_server_factory()
    with down_client(server) as client, server.paused():
        assert_transient(client.status, server.port, 2.0)
