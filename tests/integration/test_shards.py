"""Sharded queues end to end: jobs spread over shards by id, daemons serving
several shards, and one shard's Redis killed without stopping the others.

Real redis-servers (AOF on, every write fsynced, so a kill -9 loses nothing
acknowledged) and real daemons with the tiny model.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from redis.crc import key_slot

from pipeline.config import RedisSettings
from pipeline.transport.client import Client
from pipeline.transport.contract import Keys
from pipeline.transport.shards import shard_of
from tests.integration.test_serve_faults import (
    WAIT_S,
    ServerFactory,
    Tally,
    connect,
    images,  # noqa: F401  (a fixture)
    path_jobs,
)
from tests.redis_server import RedisServer
from tests.serve_daemon import DaemonFactory, ServeProcess, wait_until

pytestmark = pytest.mark.slow

SHARDS = 2


def shard_env(urls: list[str], prefix: str, root: Path, model: Path,
              **settings: str) -> dict[str, str]:
    """A daemon's environment for `len(urls)` shards, shard i at urls[i] (the same
    URL throughout: hash-tagged prefixes on one server)."""
    env = {"IMGPIPE_REDIS_URL": urls[0], "IMGPIPE_REDIS__PREFIX": prefix,
           "IMGPIPE_REDIS__SHARDS": str(len(urls)), "IMGPIPE_SERVE__ALLOWED_ROOTS": str(root),
           "IMGPIPE_MODEL__NAME": str(model), "IMGPIPE_PREPROCESS__WORKERS": "1",
           "IMGPIPE_CACHE__ENABLED": "false", "IMGPIPE_REDIS__MAX_BACKOFF_S": "0.5"}
    if len(set(urls)) > 1:
        env["IMGPIPE_REDIS__SHARD_URLS"] = " ".join(urls)
    env.update({f"IMGPIPE_{key.upper()}": value for key, value in settings.items()})
    return env


def start_all(daemon_factory: DaemonFactory, env: dict[str, str], count: int
              ) -> list[ServeProcess]:
    """`count` daemons, started together (loading models side by side), all ready."""
    daemons = [daemon_factory(env, start=False) for _ in range(count)]
    for daemon in daemons:
        daemon.start(wait_ready=False)
    for daemon in daemons:
        daemon.wait_for_log("serving ", 120.0)
    return daemons


def by_shard(job_ids: list[str]) -> list[list[str]]:
    return [[job_id for job_id in job_ids if shard_of(job_id, SHARDS) == index]
            for index in range(SHARDS)]


def queued_ids(conn: redis.Redis, keys: Keys) -> list[str]:
    return [fields[b"id"].decode() for _, fields in conn.xrange(keys.jobs)]


def assert_answered_as_submitted(tally: Tally, jobs: dict[str, str]) -> None:
    """Every job in `jobs` (id: image) answered ok, and alike for alike images."""
    labels: dict[str, set[str]] = {}
    for job_id, image in jobs.items():
        result = tally.results[job_id]
        assert result["status"] == "ok", result
        labels.setdefault(image, set()).add(result["predictions"][0]["label"])
    assert all(len(seen) == 1 for seen in labels.values()), labels


@pytest.fixture
def fsynced(redis_server_factory: ServerFactory) -> Iterator[Callable[[], tuple[RedisServer,
                                                                               redis.Redis]]]:
    """make(): a fresh server that fsyncs every write, and a connection to it."""
    conns: list[redis.Redis] = []

    def make() -> tuple[RedisServer, redis.Redis]:
        server = redis_server_factory()
        conn = connect(server)
        conn.config_set("appendfsync", "always")
        conns.append(conn)
        return server, conn

    yield make
    for conn in conns:
        conn.close()


def test_two_shards_on_two_servers_answer_every_job_and_ride_out_one_shards_outage(
        daemon_factory: DaemonFactory, fsynced: Callable[[], tuple[RedisServer, redis.Redis]],
        prefix: str, images: Path, tiny_model: Path) -> None:  # noqa: F811
    # given two Redis servers, one shard each, and 40 jobs queued before any daemon runs
    (server0, conn0), (server1, conn1) = fsynced(), fsynced()
    conns, keys = [conn0, conn1], Keys.of_shards(prefix, SHARDS)
    cfg = RedisSettings(url=server0.url, prefix=prefix, shards=SHARDS,
                        shard_urls=[server0.url, server1.url])
    submitted: dict[str, str] = {}
    with Client(cfg) as client:
        first = list(path_jobs(images, 40, "first"))
        client.submit_many(first)
        submitted.update({job["job_id"]: job["image"] for job in first})
        # then each shard's jobs stream holds exactly the jobs whose ids hash to it
        for index, ids in enumerate(by_shard(list(submitted))):
            assert ids and sorted(queued_ids(conns[index], keys[index])) == sorted(ids)
        # when two daemons serve both shards
        env = shard_env([server0.url, server1.url], prefix, images, tiny_model)
        daemons = start_all(daemon_factory, env, 2)
        tallies = [Tally(conn, key.results) for conn, key in zip(conns, keys, strict=True)]
        # then every job is answered exactly once, in its own shard
        for tally, ids in zip(tallies, by_shard(list(submitted)), strict=True):
            tally.wait_for(ids, WAIT_S, daemons)
            assert set(tally.counts) == set(ids) and tally.duplicates == 0
            assert_answered_as_submitted(tally, {i: submitted[i] for i in ids})
        # when 60 more jobs are queued on both shards and shard 1's Redis is killed
        # with SIGKILL at once, and 20 more jobs for shard 0 come during its outage
        second = list(path_jobs(images, 60, "second"))
        client.submit_many(second)
        server1.stop(kill=True)
        third = [job for job in path_jobs(images, 200, "third")
                 if shard_of(job["job_id"], SHARDS) == 0][:20]
        client.submit_many(third)
        submitted.update({job["job_id"]: job["image"] for job in second + third})
        # then shard 0's jobs are all answered while shard 1 is still down
        live, dead = by_shard(list(submitted))
        tallies[0].wait_for(live, WAIT_S, daemons)
        assert not server1.ping()
        # when shard 1's Redis comes back with its data
        server1.start()
        conn1.config_set("appendfsync", "always")
        # then every job of both shards is answered (at least once), none lost, the
        # queues are empty and the daemons still serve
        tallies[1].wait_for(dead, WAIT_S, daemons)
        for conn, key in zip(conns, keys, strict=True):
            wait_until(lambda c=conn, k=key: c.xlen(k.jobs) == 0, WAIT_S,
                       f"an empty {key.jobs}", daemons)
        assert_answered_as_submitted(tallies[0], {i: submitted[i] for i in live})
        assert_answered_as_submitted(tallies[1], {i: submitted[i] for i in dead})
        # (only the live shard's jobs came during the outage: its results are exact)
        assert tallies[0].duplicates == 0


def test_hash_tagged_shards_on_one_server_with_one_daemon(
        daemon_factory: DaemonFactory, redis_server: RedisServer, raw: redis.Redis,
        prefix: str, images: Path, tiny_model: Path, run: Any) -> None:  # noqa: F811
    # given two shards as hash-tagged prefixes on one server; first in each shard
    # 10 jobs under the same entry ids as the other shard's, then 30 queued jobs
    keys = Keys.of_shards(prefix, SHARDS)
    twins = [[f"twin-{index}-{n}" for n in range(10)] for index in range(SHARDS)]
    for key, ids in zip(keys, twins, strict=True):
        for n, job_id in enumerate(ids):
            raw.xadd(key.jobs, {"id": job_id, "image": "0.jpg"}, id=f"1-{n + 1}")
    cfg = RedisSettings(url=redis_server.url, prefix=prefix, shards=SHARDS)
    with Client(cfg) as client:
        jobs = list(path_jobs(images, 30, "tagged"))
        client.submit_many(jobs)
        # then each shard got its jobs, under its own tag, in one cluster slot per shard
        for index, ids in enumerate(by_shard([job["job_id"] for job in jobs])):
            assert ids and sorted(queued_ids(raw, keys[index])) == sorted(ids + twins[index])
            assert keys[index].jobs == f"{prefix}:{{{index}}}:jobs"
            assert {key_slot(name.encode()) for name in
                    (keys[index].jobs, keys[index].results, keys[index].dead)} == \
                {key_slot(keys[index].jobs.encode())}
        assert key_slot(keys[0].jobs.encode()) != key_slot(keys[1].jobs.encode())
        # when one daemon serves both, and `imgpipe submit --wait` sends 4 more
        # (taking over idle jobs, a safety net that would hide a mix-up, is put off)
        env = shard_env([redis_server.url] * SHARDS, prefix, images, tiny_model,
                        SERVE__CLAIM_IDLE_MS="600000")
        daemons = start_all(daemon_factory, env, 1)
        waited = run("submit", "--wait", "--json", "--timeout", "120", "--paths", str(images),
                     env={key: env[key] for key in env if "REDIS" in key})
        # then the command's four results came back through the shards' reply streams
        assert waited.returncode == 0, waited.stderr
        assert "(2 shards)" in waited.stderr
        assert sorted(json.loads(line)["status"] for line in waited.stdout.splitlines()) \
            == ["ok"] * 4
        # and the queued jobs' results are in their shards' result streams, each
        # once, the twins' too (equal entry ids in two shards are two jobs)
        for index, ids in enumerate(by_shard([job["job_id"] for job in jobs])):
            tally = Tally(raw, keys[index].results)
            tally.wait_for(ids + twins[index], WAIT_S, daemons)
            assert set(tally.counts) == set(ids + twins[index]) and tally.duplicates == 0
            assert all(tally.results[twin]["status"] == "ok" for twin in twins[index])
        # and status adds both shards up, and shows each
        status = client.status()
        assert [shard.results for shard in status.shards] == \
            [len(ids) + 10 for ids in by_shard([job["job_id"] for job in jobs])]
        assert status.results == 50 and status.jobs == 0 and status.group_exists
        shown = run("status", env={key: env[key] for key in env if "REDIS" in key})
        assert f"{keys[1].jobs} at 127.0.0.1:{redis_server.port}:" in shown.stdout
        # when 200 more jobs come and the daemon gets SIGTERM once it has answered some
        more = [job["job_id"] for job in path_jobs(images, 200, "drained")]
        client.submit_many(path_jobs(images, 200, "drained"))
        wait_until(lambda: client.status().results > 55, WAIT_S, "a result", daemons)
        # then it exits 0, every job it read from either shard answered (none left
        # pending), and it leaves both shards' groups
        assert daemons[0].stop() == 0, daemons[0].log()[-3000:]
        drained = client.status()
        assert [shard.pending for shard in drained.shards] == [0, 0]
        assert drained.results + drained.jobs == 50 + len(more) and drained.consumers == []


def test_a_daemon_serves_only_the_shards_it_is_given(
        daemon_factory: DaemonFactory, redis_server: RedisServer, raw: redis.Redis,
        prefix: str, images: Path, tiny_model: Path) -> None:  # noqa: F811
    # given 20 jobs over two shards, and a daemon told to serve shard 1 only
    keys = Keys.of_shards(prefix, SHARDS)
    with Client(RedisSettings(url=redis_server.url, prefix=prefix, shards=SHARDS)) as client:
        jobs = list(path_jobs(images, 20, "one"))
        client.submit_many(jobs)
    ids = by_shard([job["job_id"] for job in jobs])
    env = shard_env([redis_server.url] * SHARDS, prefix, images, tiny_model, SERVE__SHARDS="1")
    daemons = start_all(daemon_factory, env, 1)
    # then shard 1's jobs are answered, in shard 1
    Tally(raw, keys[1].results).wait_for(ids[1], WAIT_S, daemons)
    wait_until(lambda: raw.xlen(keys[1].jobs) == 0, WAIT_S, "an empty shard 1", daemons)
    # and shard 0's wait untouched: no group was even made there
    assert sorted(queued_ids(raw, keys[0])) == sorted(ids[0])
    assert raw.xlen(keys[0].results) == 0
    assert raw.xinfo_groups(keys[0].jobs) == []


def test_dead_letters_are_listed_retried_and_purged_across_shards(
        redis_server: RedisServer, raw: redis.Redis, prefix: str, run: Any) -> None:
    # given a dead letter in each of two shards
    keys = Keys.of_shards(prefix, SHARDS)
    letters = [raw.xadd(key.dead, {"id": f"job-{index}", "image": "/x.png",
                                   "error": json.dumps({"code": "too_many_deliveries"}),
                                   "deliveries": "3", "entry_id": "1-0"}).decode()
               for index, key in enumerate(keys)]
    with Client(RedisSettings(url=redis_server.url, prefix=prefix, shards=SHARDS)) as client:
        # then the list shows both, each id naming its shard
        listed = client.dead_list()
        assert sorted(dead_id for dead_id, _ in listed) == \
            sorted(f"{index}/{letter}" for index, letter in enumerate(letters))
        assert {letter["id"] for _, letter in listed} == {"job-0", "job-1"}
        # and an id without its shard is refused, naming the form, by the command too
        with pytest.raises(ValueError, match="1/1716200000000-0"):
            client.dead_retry([letters[1]])
        env = {"IMGPIPE_REDIS_URL": redis_server.url, "IMGPIPE_REDIS__PREFIX": prefix,
               "IMGPIPE_REDIS__SHARDS": str(SHARDS)}
        shown = run("dead", "list", env=env)
        assert shown.returncode == 0
        assert sorted(line.split()[:3] for line in shown.stdout.splitlines()) == \
            [[f"{index}/{letter}", "job", f"job-{index}"] for index, letter in enumerate(letters)]
        refused = run("dead", "retry", letters[1], env=env)
        assert refused.returncode == 2 and "1/1716200000000-0" in refused.stderr
        # when shard 1's letter is retried
        assert client.dead_retry([f"1/{letters[1]}"]) == 1
        # then it is a job again in shard 1 only
        assert queued_ids(raw, keys[1]) == ["job-1"] and raw.xlen(keys[0].jobs) == 0
        # and purging removes the one left, in shard 0
        assert client.dead_purge() == 1
        assert raw.xlen(keys[0].dead) == 0 and raw.xlen(keys[1].dead) == 0
