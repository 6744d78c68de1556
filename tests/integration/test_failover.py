"""Redis behind Sentinel: a failover mid-run loses no job the client was told was
queued, and the daemon follows the primary without exiting.

Real servers (tests/redis_sentinel.py): a primary, a replica and three
sentinels on loopback; a real `imgpipe serve` with the tiny model. Waits are
on Redis state and log lines; their timeouts only bound a failure.
"""

from __future__ import annotations

import itertools
import re
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
import redis
from PIL import Image

from pipeline.cache.redis_tier import RedisTier
from pipeline.config import RedisSettings
from pipeline.errors import TransientError
from pipeline.transport.client import SUBMIT_TRIES, Client, NotReplicated
from tests.integration.conftest import run_imgpipe
from tests.integration.test_serve_faults import GROUP, Tally, path_jobs
from tests.redis_sentinel import SentinelSet, in_sync
from tests.redis_server import RedisServer
from tests.serve_daemon import DaemonFactory, ServeProcess, wait_until

pytestmark = pytest.mark.slow

JOBS = 1000
CHUNK = 50
FAIL_OVER_AFTER_CHUNKS = 10  # of 20: with jobs answered, in flight and queued
FAILOVER_TIMEOUT_S = 60.0
WAIT_S = 120.0
SECRET = "sentinel-test-secret"


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """An allowed root of a few small pictures."""
    root = tmp_path / "images"
    root.mkdir()
    for index, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (48, 32), colour).save(root / f"{index}.png")
    return root


def sentinel_env(url: str, prefix: str, root: Path, model: Path,
                 **settings: str) -> dict[str, str]:
    """A daemon's environment for the Redis at `url`: the tiny model, one worker."""
    env = {"IMGPIPE_REDIS_URL": url, "IMGPIPE_REDIS__PREFIX": prefix,
           "IMGPIPE_REDIS__MAX_BACKOFF_S": "0.5",
           "IMGPIPE_SERVE__ALLOWED_ROOTS": str(root), "IMGPIPE_MODEL__NAME": str(model),
           "IMGPIPE_PREPROCESS__WORKERS": "1", "IMGPIPE_CACHE__ENABLED": "false"}
    env.update({f"IMGPIPE_{key.upper()}": value for key, value in settings.items()})
    return env


def outages(daemon: ServeProcess) -> list[str]:
    """The daemon's outage warnings in order: "unavailable" and "is back"."""
    return re.findall(r"Redis at [^\"]* (unavailable|is back)", daemon.log())


def chunks(jobs: Iterable[dict[str, Any]], size: int) -> Iterator[list[dict[str, Any]]]:
    iterator = iter(jobs)
    while chunk := list(itertools.islice(iterator, size)):
        yield chunk


class Failover:
    """Starts a failover and watches the sentinels; once they name a new primary,
    a killed one is started again as its replica (so that WAIT can be met again)."""

    def __init__(self, servers: SentinelSet) -> None:
        self.servers = servers
        old_port = servers.primary_port()
        assert old_port is not None
        self.old_port = old_port
        self.killed: Optional[RedisServer] = None
        self.restarted = False
        self.replaced = False  # the sentinels have named another primary

    def kill_primary(self) -> None:
        self.killed = self.servers.server_on(self.old_port)
        self.killed.stop(kill=True)

    def demote_primary(self) -> None:
        """SENTINEL FAILOVER, and wait for it: submits to the old primary until then
        would simply succeed."""
        with self.servers.sentinels[0].client() as conn:
            conn.sentinel_failover(self.servers.service)
        wait_until(lambda: self.new_port() is not None, FAILOVER_TIMEOUT_S,
                   "the sentinels to name the replica primary")

    def new_port(self) -> int | None:
        port = self.servers.primary_port()
        if port is None or port == self.old_port:
            return None
        self.replaced = True
        return port

    def follow(self) -> None:
        """Called between submit tries: bring the old primary back once replaced."""
        new_port = self.new_port()
        if self.killed is not None and not self.restarted and new_port is not None:
            self.servers.rejoin(self.killed, new_port)
            self.restarted = True


def submit_until_queued(client: Client, chunk: list[dict[str, Any]],
                        between_tries: Callable[[], None], daemon: ServeProcess) -> None:
    """Submit `chunk` until the client says it is queued (a caller's retry loop:
    the same job ids each time), over outages and replica shortfalls."""
    def queued() -> bool:
        try:
            client.submit_many(chunk, chunk=len(chunk))
        except TransientError:  # no primary yet, or too few replicas: try again
            between_tries()
            return False
        return True

    wait_until(queued, FAILOVER_TIMEOUT_S, "a chunk of jobs queued and replicated", [daemon])


# -- the failover ----------------------------------------------------------------

def test_a_primary_killed_mid_run_loses_no_queued_job_and_the_daemon_serves_on(
        daemon_factory: DaemonFactory, sentinel_set: SentinelSet, images: Path,
        tiny_model: Path) -> None:
    # given a daemon reading through the sentinels
    prefix = "failover"
    daemon = daemon_factory(sentinel_env(sentinel_set.url(), prefix, images, tiny_model))
    # when 1,000 jobs are submitted in chunks and the primary is killed (SIGKILL)
    # part-way, with jobs answered, in flight and queued
    ids, tally = submit_through_a_failover(sentinel_set, prefix, images, daemon,
                                           Failover.kill_primary)
    # then every job the client was told was queued has a result on the new primary
    tally.wait_for(ids, timeout_s=WAIT_S, serving=[daemon])
    assert all(result["status"] == "ok" for result in tally.results.values())
    wait_until(lambda: tally.conn.xlen(f"{prefix}:jobs") == 0, 30.0, "an empty jobs stream",
               [daemon])
    # and the daemon never exited: it warned once per outage (sentinels catching up
    # with each other may make two of one failover), is still there, and stops
    # cleanly when asked
    assert outages(daemon) in (["unavailable", "is back"], ["unavailable", "is back"] * 2), \
        daemon.log()[-3000:]
    assert daemon.process is not None and daemon.process.poll() is None
    assert daemon.stop() == 0, daemon.log()[-3000:]
    print(f"duplicates: {tally.duplicates}")


def test_a_new_primary_without_the_consumer_group_gets_it_again_and_loses_no_job(
        daemon_factory: DaemonFactory, sentinel_set: SentinelSet, images: Path,
        tiny_model: Path) -> None:
    # given a daemon whose consumer group the replica lacks (as when the primary
    # died before its creation reached the replica): dropped there alone
    prefix = "no-group"
    daemon = daemon_factory(sentinel_env(sentinel_set.url(), prefix, images, tiny_model))
    replica = sentinel_set.data_client(sentinel_set.replica.port)
    wait_until(lambda: replica.exists(f"{prefix}:jobs") and replica.xinfo_groups(
        f"{prefix}:jobs"), 30.0, "the group on the replica")
    replica.config_set("replica-read-only", "no")  # a write the primary never sees
    replica.xgroup_destroy(f"{prefix}:jobs", GROUP)
    assert not replica.xinfo_groups(f"{prefix}:jobs")
    # when jobs are submitted through the primary's death and the replica's promotion
    ids, tally = submit_through_a_failover(sentinel_set, prefix, images, daemon,
                                           Failover.kill_primary)
    # then the daemon made the group again on the new primary and answered every job
    tally.wait_for(ids, timeout_s=WAIT_S, serving=[daemon])
    assert "creating it again" in daemon.log()
    groups = tally.conn.xinfo_groups(f"{prefix}:jobs")
    assert [group["name"] for group in groups] == [GROUP.encode()]
    assert daemon.stop() == 0, daemon.log()[-3000:]
    replica.close()


def test_a_daemon_follows_a_graceful_failover_off_a_primary_that_stays_up(
        daemon_factory: DaemonFactory, sentinel_set: SentinelSet, images: Path,
        tiny_model: Path) -> None:
    # given a daemon reading through the sentinels
    prefix = "demoted"
    daemon = daemon_factory(sentinel_env(sentinel_set.url(), prefix, images, tiny_model))
    # when the sentinels hand the primary role to the replica (SENTINEL FAILOVER):
    # the old primary stays up, demoted to a replica that refuses writes (READONLY)
    ids, tally = submit_through_a_failover(sentinel_set, prefix, images, daemon,
                                           Failover.demote_primary)
    # then the daemon left the demoted primary for the new one and answered every job
    tally.wait_for(ids, timeout_s=WAIT_S, serving=[daemon])
    old = sentinel_set.data_client(sentinel_set.primary.port)
    assert old.info("replication")["role"] == "slave"
    assert daemon.stop() == 0, daemon.log()[-3000:]
    print(f"duplicates: {tally.duplicates}")
    old.close()


def submit_through_a_failover(servers: SentinelSet, prefix: str, images: Path,
                              daemon: ServeProcess, fail_over: Callable[[Failover], None]
                              ) -> tuple[list[str], Tally]:
    """Submit JOBS path jobs in chunks through a client that waits for the replica;
    once half are queued and some answered, `fail_over`. Returns the ids the client
    was told were queued, and a Tally of the results on the new primary."""
    failover = Failover(servers)
    primary = servers.data_client(failover.old_port)
    client = Client(RedisSettings(url=servers.url(), prefix=prefix, timeout_s=2.0))
    assert client.replicas_to_wait_for() == 1  # auto: the primary has a replica
    ids: list[str] = []
    for index, chunk in enumerate(chunks(path_jobs(images, JOBS), CHUNK)):
        if index == FAIL_OVER_AFTER_CHUNKS:
            Tally(primary, f"{prefix}:results").wait_for_total(CHUNK)
            fail_over(failover)
        submit_until_queued(client, chunk, failover.follow, daemon)
        ids += [job["job_id"] for job in chunk]
    client.close()
    primary.close()
    assert failover.replaced, "the sentinels named no new primary"
    # Usually the replica; the old primary again if the sentinels, once it rejoined,
    # judged the new one down too (a busy machine may stall it past DOWN_AFTER_MS).
    now_port = servers.primary_port()
    assert now_port is not None, "no sentinel names a primary"
    daemon.wait_for_log("is back")  # the daemon noticed the failover too
    return ids, Tally(servers.data_client(now_port), f"{prefix}:results")


# -- no primary --------------------------------------------------------------------

def test_a_daemon_whose_sentinels_name_no_primary_waits_says_so_once_then_serves(
        daemon_factory: DaemonFactory, sentinel_set: SentinelSet, images: Path,
        tiny_model: Path) -> None:
    # given sentinels that monitor no service by the name the daemon asks for
    prefix, service = "no-primary", "later"
    daemon = daemon_factory(sentinel_env(sentinel_set.url(service), prefix, images,
                                         tiny_model), start=False)
    daemon.start(wait_ready=False)
    # then it waits: says once that the service has no primary, and is not serving
    daemon.wait_for_log("unavailable", timeout_s=120.0)
    assert f"no sentinel (of 3) names a primary for service '{service}'" in daemon.log()
    assert "serving " not in daemon.log()
    # when the sentinels start monitoring the primary under that name
    primary_port = sentinel_set.primary_port()
    for server in sentinel_set.sentinels:
        with server.client() as conn:
            conn.sentinel_monitor(service, "127.0.0.1", primary_port, 2)
    # then it serves, having said "unavailable" once for the whole wait
    daemon.wait_for_log("serving ", timeout_s=60.0)
    conn = sentinel_set.data_client(primary_port or 0)
    with Client(RedisSettings(url=sentinel_set.url(service), prefix=prefix)) as client:
        ids = client.submit_many(path_jobs(images, 20))
    Tally(conn, f"{prefix}:results").wait_for(ids, serving=[daemon])
    assert daemon.log().count("unavailable") == 1, daemon.log()[-3000:]
    conn.close()


def test_an_unusable_sentinel_url_ends_serve_at_start_with_one_line(tmp_path: Path) -> None:
    url = f"redis+sentinel://worker:{SECRET}@127.0.0.1:1,127.0.0.1:x/jobs"
    done = run_imgpipe("serve", env={"IMGPIPE_REDIS_URL": url}, timeout=120)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and "invalid port in sentinel address 2 of 2" in lines[0], lines
    assert SECRET not in done.stderr + done.stdout


# -- WAIT --------------------------------------------------------------------------

def test_with_a_replica_each_submit_chunk_waits_for_it_once(
        sentinel_set: SentinelSet) -> None:
    # given a client of the primary through the sentinels (auto: it has a replica)
    url, prefix = sentinel_set.url(), "wait-once"
    primary = sentinel_set.data_client(sentinel_set.primary.port)
    before = wait_calls(primary)
    # when 1,000 jobs are submitted in chunks of 500 and one on its own
    with Client(RedisSettings(url=url, prefix=prefix)) as client:
        client.submit_many(({"image": "x.png"} for _ in range(1000)), chunk=500)
        client.submit(image="y.png")
    # then each was confirmed by one WAIT, and the replica holds every job
    assert wait_calls(primary) - before == 3
    replica = sentinel_set.data_client(sentinel_set.replica.port)
    assert replica.xlen(f"{prefix}:jobs") == 1001
    primary.close()
    replica.close()


def test_without_a_replica_a_submit_waits_for_none(redis_server: RedisServer) -> None:
    conn = redis.Redis.from_url(redis_server.url)
    before = wait_calls(conn)
    with Client(RedisSettings(url=redis_server.url, prefix="no-wait")) as client:
        assert client.replicas_to_wait_for() == 0
        client.submit_many(({"image": "x.png"} for _ in range(10)), chunk=5)
    assert wait_calls(conn) == before
    conn.close()


def test_a_replica_shortfall_is_retried_then_a_clear_error(
        redis_server: RedisServer) -> None:
    # given a client that asks for one replica of a primary that has none
    prefix = "short"
    settings = RedisSettings(url=redis_server.url, prefix=prefix, submit_wait_replicas=1,
                             submit_wait_timeout_ms=20)
    conn = redis.Redis.from_url(redis_server.url)
    # when it submits a chunk of 3 jobs
    with Client(settings) as client, pytest.raises(NotReplicated) as caught:
        client.submit_many([{"image": f"{n}.png", "job_id": f"j{n}"} for n in range(3)])
    # then it sent them SUBMIT_TRIES times, the same job ids, then said how many
    # replicas acknowledged
    sent = [fields[b"id"].decode() for _, fields in conn.xrange(f"{prefix}:jobs")]
    assert sent == ["j0", "j1", "j2"] * SUBMIT_TRIES
    error = caught.value
    assert (error.acknowledged, error.wanted, error.job_ids) == (0, 1, ["j0", "j1", "j2"])
    assert f"0 of 1 replicas acknowledged 3 jobs within 20 ms, {SUBMIT_TRIES} tries" \
        in str(error)
    conn.delete(f"{prefix}:jobs")
    conn.close()


def test_a_paused_replica_fails_the_submit_and_a_resumed_one_confirms_it(
        sentinel_set: SentinelSet) -> None:
    # given a client that waited for the replica before
    settings = RedisSettings(url=sentinel_set.url(), prefix="paused",
                             submit_wait_timeout_ms=50)
    with Client(settings) as client:
        client.submit(image="a.png")
        # when the replica stops answering, then a submit is not confirmed
        with sentinel_set.replica.paused(), pytest.raises(NotReplicated, match="0 of 1"):
            client.submit(image="b.png")
        # and once it is back, submits are confirmed again
        wait_until(lambda: in_sync(sentinel_set.replica), 30.0, "the replica in sync")
        client.submit(image="c.png")


def wait_calls(conn: redis.Redis) -> int:
    """How many WAIT commands the server has run."""
    stats: Any = conn.info("commandstats")
    return int(stats.get("cmdstat_wait", {}).get("calls", 0))


# -- the cache -----------------------------------------------------------------------

def test_the_cache_tier_reaches_its_redis_through_the_sentinels(
        sentinel_set: SentinelSet) -> None:
    tier = RedisTier(RedisSettings(url=sentinel_set.url(), timeout_s=2.0), "sentinel-cache",
                     ttl_s=60, max_entry_bytes=1024)
    assert tier.setup()
    tier.set("imgpipe:cache:k", b"value")
    assert tier.get("imgpipe:cache:k") == b"value"
    assert tier.location.startswith("service imgpipe-primary via sentinels")
    tier.close()
