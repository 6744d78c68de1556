"""`imgpipe serve` under faults: killed daemons, a restarted Redis, signals, poison, a backlog.

A real redis-server and real daemon subprocesses, no mocks. The tiny
TorchScript model and a few small images keep every test short; each test
has its own key prefix (or its own server, when it stops or pauses Redis).
Waits are generous and nothing is asserted about speed: the machine is shared.
"""

from __future__ import annotations

import re
import signal
import socket
import statistics
import threading
import time
import urllib.request
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import psutil
import pytest
import redis
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from pipeline.config import RedisSettings
from pipeline.transport import contract
from pipeline.transport.client import Client
from tests.redis_server import RedisServer, free_port
from tests.serve_daemon import DaemonFactory, ServeProcess, wait_until

pytestmark = pytest.mark.slow

GROUP = "imgpipe"
WAIT_S = 120.0  # for results: generous, the machine is noisy
WINDOW_MAX = 300  # jobs a daemon may hold at once (preprocess window + queues + a batch)
RSS_MARGIN = 50 * 1024 * 1024
ServerFactory = Callable[[], RedisServer]


# -- fixtures and helpers ------------------------------------------------------

@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return f"faults-{request.node.name}"


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """A directory (an allowed root) of a few small JPEGs and PNGs."""
    root = tmp_path / "images"
    root.mkdir()
    colours = [(200, 30, 30), (30, 200, 30), (30, 30, 200), (220, 220, 40)]
    for index, colour in enumerate(colours):
        picture = Image.new("RGB", (48, 32), colour)
        picture.save(root / f"{index}.{'png' if index % 2 else 'jpg'}")
    return root


def serve_env(server: RedisServer, prefix: str, root: Path, model: Path,
              **settings: str) -> dict[str, str]:
    """A daemon's environment: the tiny model, one worker, no cache; `settings` as
    SECTION__KEY="value"."""
    env = {"IMGPIPE_REDIS_URL": server.url, "IMGPIPE_REDIS__PREFIX": prefix,
           "IMGPIPE_SERVE__ALLOWED_ROOTS": str(root), "IMGPIPE_MODEL__NAME": str(model),
           "IMGPIPE_PREPROCESS__WORKERS": "1", "IMGPIPE_CACHE__ENABLED": "false"}
    env.update({f"IMGPIPE_{key.upper()}": value for key, value in settings.items()})
    return env


def path_jobs(root: Path, count: int, tag: str = "job") -> Iterator[dict[str, Any]]:
    """`count` path jobs over the images in `root`, with ids tag-0, tag-1, ..."""
    names = sorted(path.name for path in root.iterdir())
    for index in range(count):
        yield {"image": names[index % len(names)], "job_id": f"{tag}-{index}"}


def connect(server: RedisServer) -> redis.Redis:
    return redis.Redis.from_url(server.url)


class Tally:
    """The results in one stream, counted by job id as they arrive."""

    def __init__(self, conn: redis.Redis, stream: str) -> None:
        self.conn = conn
        self.stream = stream
        self.after = "-"
        self.counts: Counter[str] = Counter()
        self.results: dict[str, dict[str, Any]] = {}  # the first result of each job

    def read(self) -> int:
        """Take in what arrived since the last call; the number of results so far."""
        while page := self.conn.xrange(self.stream, self.after, "+", count=5000):
            for _, fields in page:
                result = contract.decode_result(fields)
                self.counts[result["job_id"]] += 1
                self.results.setdefault(result["job_id"], result)
            self.after = "(" + page[-1][0].decode()
        return self.total

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def duplicates(self) -> int:
        return self.total - len(self.counts)

    def wait_for_total(self, total: int, timeout_s: float = WAIT_S) -> None:
        wait_until(lambda: self.read() >= total, timeout_s, f"{total} results on {self.stream}")

    def wait_for(self, job_ids: list[str], timeout_s: float = WAIT_S,
                 serving: Sequence[ServeProcess] = ()) -> None:
        """Until every one of `job_ids` has a result; fails at once if one of the
        `serving` daemons exits meanwhile."""
        wanted = set(job_ids)

        def arrived() -> bool:
            self.read()
            return wanted <= self.counts.keys()

        def missing() -> str:
            left = sorted(wanted - self.counts.keys())
            return f"results for all {len(wanted)} jobs ({len(left)} missing, e.g. {left[:5]})"

        wait_until(arrived, timeout_s, missing, serving)


def pending(conn: redis.Redis, prefix: str) -> int:
    """Entries delivered to some consumer and not acknowledged."""
    return int(conn.xpending(f"{prefix}:jobs", GROUP)["pending"])


def unanswered_ids(conn: redis.Redis, prefix: str) -> list[str]:
    """The job ids of the entries still in the jobs stream."""
    return [fields[b"id"].decode() for _, fields in conn.xrange(f"{prefix}:jobs")]


def logged_count(daemon: ServeProcess, pattern: str) -> int:
    """The number in the daemon's one log line matching `pattern` (one group)."""
    found = re.findall(pattern, daemon.log())
    assert len(found) == 1, (pattern, daemon.log()[-3000:])
    return int(found[0])


def logged_total(daemon: ServeProcess, pattern: str) -> int:
    """The numbers in every log line matching `pattern` (one group), summed: a
    count the daemon logs once per pass, however many passes it took."""
    return sum(int(found) for found in re.findall(pattern, daemon.log()))


def persisted(conn: redis.Redis) -> bool:
    """Whether everything written so far is on disk: once an AOF rewrite (asked
    for by `persist`) has finished, even a kill -9 of the server loses none of it."""
    info = conn.info("persistence")
    return (not info["aof_rewrite_in_progress"] and not info["aof_rewrite_scheduled"]
            and info["aof_last_bgrewrite_status"] == "ok")


def persist(server: RedisServer) -> None:
    """Rewrite the server's AOF and wait until the rewrite is done (instead of
    waiting out appendfsync everysec's second and hoping)."""
    conn = connect(server)
    conn.bgrewriteaof()
    wait_until(lambda: persisted(conn), 60.0, "the AOF rewrite to finish")
    conn.close()


def only_client(conn: redis.Redis) -> bool:
    """Whether `conn` is the server's one connection: every other client's
    connection (and what it had sent before it went) has been dealt with."""
    own = conn.client_id()
    return all(int(client["id"]) == own for client in conn.client_list())


def answered(daemon: ServeProcess) -> int:
    """N of the daemon's closing "stopped after answering N jobs" line."""
    return logged_count(daemon, r"stopped after answering (\d+) jobs")


class Doorstep:
    """A listener on a port in Redis's stead (while it is down) that counts the
    connections made to it, hanging up on each at once."""

    def __init__(self, port: int) -> None:
        self._sock = socket.create_server(("127.0.0.1", port))
        self._sock.settimeout(0.05)
        self.knocks = 0
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._answer, daemon=True)
        self._thread.start()

    def _answer(self) -> None:
        while not self._closed.is_set():
            try:
                conn, _ = self._sock.accept()
            except TimeoutError:
                continue
            conn.close()
            self.knocks += 1

    def __enter__(self) -> Doorstep:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self._closed.set()
        self._thread.join(10.0)
        self._sock.close()


def jobs_finished(port: int) -> float:
    """imgpipe_jobs_total, every status, from a daemon's /metrics."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=30.0) as response:
        text = response.read().decode()
    return sum(sample.value for family in text_string_to_metric_families(text)
               for sample in family.samples if sample.name == "imgpipe_jobs_total")


def gone(process: psutil.Process) -> bool:
    """Exited (a zombie left for an init that may not reap counts as exited)."""
    try:
        return process.status() == psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return True


def tree_rss(process: psutil.Process) -> int:
    """Resident memory of a process and all of its descendants, in bytes."""
    total = 0
    for member in [process, *process.children(recursive=True)]:
        try:
            total += member.memory_info().rss
        except psutil.NoSuchProcess:
            continue
    return total


# -- a daemon dies --------------------------------------------------------------

def test_a_killed_daemons_jobs_are_taken_over_after_a_restart(
        daemon_factory: DaemonFactory, redis_server: RedisServer,
        prefix: str, images: Path, tiny_model: Path) -> None:
    # given a daemon (consumer name host-pid) busy with 2,000 jobs
    env = serve_env(redis_server, prefix, images, tiny_model,
                    SERVE__CLAIM_IDLE_MS="1500", SERVE__RECLAIM_INTERVAL_S="0.5")
    first = daemon_factory(env)
    workers = psutil.Process(first.pid).children(recursive=True)  # and the resource tracker
    assert workers, "the daemon has no preprocessing workers"
    conn = connect(redis_server)
    tally = Tally(conn, f"{prefix}:results")
    with Client(RedisSettings(url=redis_server.url, prefix=prefix)) as client:
        ids = client.submit_many(path_jobs(images, 2000), chunk=1000)
    tally.wait_for_total(200)
    # when it is killed with SIGKILL part way through
    first.kill()
    killed_at = time.monotonic()
    in_flight = pending(conn, prefix)
    answered_before = tally.read()
    # then its workers leave by themselves
    wait_until(lambda: all(map(gone, workers)), 60.0, "the killed daemon's workers to exit")
    workers_left_s = time.monotonic() - killed_at
    assert 0 < in_flight <= WINDOW_MAX and answered_before < len(ids)
    # and the same command, started again, takes its jobs over: every job answered,
    # duplicates at most the jobs that were in flight
    second = daemon_factory(env)
    tally.wait_for(ids, serving=[second])
    wait_until(lambda: pending(conn, prefix) == 0, 30.0, "no pending entries")
    assert tally.duplicates <= in_flight, (tally.duplicates, in_flight)
    assert all(result["status"] == "ok" for result in tally.results.values())
    assert conn.xlen(f"{prefix}:jobs") == 0
    # (one line per reclaim pass that took any: the takeover may span passes)
    assert 0 < logged_total(second, r"took over (\d+) jobs") <= in_flight
    print(f"in flight at the kill: {in_flight}; answered before: {answered_before}; "
          f"duplicates: {tally.duplicates}; workers gone after {workers_left_s:.1f} s")
    conn.close()


def test_a_restart_under_the_same_name_re_reads_its_own_pending_jobs(
        daemon_factory: DaemonFactory, redis_server: RedisServer,
        prefix: str, images: Path, tiny_model: Path) -> None:
    # given a daemon with a fixed consumer name and a claim timeout far away
    env = serve_env(redis_server, prefix, images, tiny_model, SERVE__CONSUMER="fixed",
                    SERVE__CLAIM_IDLE_MS="600000")
    first = daemon_factory(env)
    conn = connect(redis_server)
    tally = Tally(conn, f"{prefix}:results")
    with Client(RedisSettings(url=redis_server.url, prefix=prefix)) as client:
        ids = client.submit_many(path_jobs(images, 1000), chunk=1000)
    tally.wait_for_total(100)
    # when it is killed part way through and started again under the same name
    first.kill()
    in_flight = pending(conn, prefix)
    assert in_flight > 0
    second = daemon_factory(env)
    # then it re-reads its own pending jobs at once (no claim timeout) and answers all
    tally.wait_for(ids, serving=[second])
    assert tally.duplicates <= in_flight, (tally.duplicates, in_flight)
    assert 0 < logged_count(second, r"re-read (\d+) of this consumer's") <= in_flight
    assert "took over" not in second.log()
    assert pending(conn, prefix) == 0 and conn.xlen(f"{prefix}:jobs") == 0
    print(f"in flight at the kill: {in_flight}; duplicates: {tally.duplicates}")
    conn.close()


def test_a_group_reset_while_jobs_are_in_flight_delivers_them_again_without_a_crash(
        daemon_factory: DaemonFactory, redis_server: RedisServer,
        prefix: str, images: Path, tiny_model: Path) -> None:
    # given a daemon busy with 1,000 jobs
    daemon = daemon_factory(serve_env(redis_server, prefix, images, tiny_model))
    conn = connect(redis_server)
    tally = Tally(conn, f"{prefix}:results")
    with Client(RedisSettings(url=redis_server.url, prefix=prefix)) as client:
        ids = client.submit_many(path_jobs(images, 1000), chunk=1000)
    tally.wait_for_total(100)
    # when an operator moves the group back to the start (a replay), so the jobs
    # in flight are delivered to the daemon a second time
    in_flight = pending(conn, prefix)
    conn.xgroup_setid(f"{prefix}:jobs", GROUP, "0")
    # then it serves on, and every job is answered (those in flight once, not twice)
    tally.wait_for(ids, serving=[daemon])
    assert daemon.process is not None and daemon.process.poll() is None, daemon.log()[-3000:]
    assert tally.duplicates <= in_flight, (tally.duplicates, in_flight)
    wait_until(lambda: pending(conn, prefix) == 0, 30.0, "no pending entries")
    assert conn.xlen(f"{prefix}:jobs") == 0
    print(f"in flight at the reset: {in_flight}; duplicates: {tally.duplicates}")
    conn.close()


# -- Redis goes away ------------------------------------------------------------

def test_the_daemon_rides_out_a_clean_redis_restart(
        daemon_factory: DaemonFactory, redis_server_factory: ServerFactory,
        prefix: str, images: Path, tiny_model: Path) -> None:
    # given a daemon busy with 1,500 jobs on a server of its own
    server = redis_server_factory()
    daemon = daemon_factory(serve_env(server, prefix, images, tiny_model))
    conn = connect(server)
    tally = Tally(conn, f"{prefix}:results")
    settings = RedisSettings(url=server.url, prefix=prefix)
    with Client(settings) as client:
        ids = client.submit_many(path_jobs(images, 1500), chunk=1000)
    tally.wait_for_total(100)
    # when Redis shuts down cleanly (AOF flushed), stays away while the daemon
    # tries it three more times, and comes back
    server.stop()
    daemon.wait_for_log("unavailable")
    with Doorstep(server.port) as doorstep:
        wait_until(lambda: doorstep.knocks >= 3, 60.0, "three more tries", [daemon])
    server.start()
    daemon.wait_for_log("is back")
    with Client(settings) as client:
        ids += client.submit_many(path_jobs(images, 100, tag="after"))
    # then the daemon kept running, logged the outage once, and every job has a result
    tally.wait_for(ids, serving=[daemon])
    assert daemon.log().count("unavailable") == 1, daemon.log()[-3000:]
    assert "took over" not in daemon.log()  # nothing waited for the claim timeout
    wait_until(lambda: pending(conn, prefix) == 0, 30.0, "no pending entries")
    assert conn.xlen(f"{prefix}:jobs") == 0
    print(f"duplicates: {tally.duplicates}")
    conn.close()


def test_after_redis_is_killed_the_daemon_serves_on_and_jobs_persisted_are_answered(
        daemon_factory: DaemonFactory, redis_server_factory: ServerFactory,
        prefix: str, images: Path, tiny_model: Path) -> None:
    # given 3,000 queued jobs, all of them persisted (appendfsync everysec alone
    # may lose the last second of writes to a kill -9), and a daemon busy with them
    server = redis_server_factory()
    settings = RedisSettings(url=server.url, prefix=prefix)
    with Client(settings) as client:
        ids = client.submit_many(path_jobs(images, 3000), chunk=1000)
    persist(server)
    daemon = daemon_factory(serve_env(server, prefix, images, tiny_model))
    before = connect(server)
    Tally(before, f"{prefix}:results").wait_for_total(100)
    before.close()
    # when Redis is killed and started again
    server.stop(kill=True)
    daemon.wait_for_log("unavailable")
    server.start()
    daemon.wait_for_log("is back")
    # then the daemon still runs, serves new jobs, and every queued job gets a result,
    # none after waiting for the claim timeout
    conn = connect(server)
    tally = Tally(conn, f"{prefix}:results")
    with Client(settings) as client:
        ids += client.submit_many(path_jobs(images, 100, tag="after"))
    tally.wait_for(ids, serving=[daemon])
    assert "took over" not in daemon.log()
    wait_until(lambda: conn.xlen(f"{prefix}:jobs") == 0, 30.0, "an empty jobs stream")
    print(f"duplicates: {tally.duplicates}")
    conn.close()


def test_jobs_delivered_in_a_reply_lost_to_an_outage_do_not_wait_for_the_claim_timeout(
        daemon_factory: DaemonFactory, redis_server_factory: ServerFactory,
        prefix: str, images: Path, tiny_model: Path) -> None:
    # given a daemon busy with 1,000 jobs, its socket timeout short, and a claim
    # timeout (an hour) far beyond this test's own limit
    server = redis_server_factory()
    daemon = daemon_factory(serve_env(server, prefix, images, tiny_model,
                                      REDIS__TIMEOUT_S="1", SERVE__CLAIM_IDLE_MS="3600000"))
    conn = connect(server)
    tally = Tally(conn, f"{prefix}:results")
    with Client(RedisSettings(url=server.url, prefix=prefix)) as client:
        ids = client.submit_many(path_jobs(images, 1000), chunk=1000)
    tally.wait_for_total(50)
    # when Redis stops answering until the daemon's commands time out: any read
    # (or write) in flight then may run once Redis resumes, its reply lost
    with server.paused():
        daemon.wait_for_log("unavailable")
    daemon.wait_for_log("is back")
    # then every job is answered, long before any claim timeout could have
    # handed one over, by the daemon that is still running ...
    tally.wait_for(ids, timeout_s=WAIT_S, serving=[daemon])
    assert "took over" not in daemon.log()
    # ... none lost: nothing is left pending or queued once the daemon is idle,
    wait_until(lambda: pending(conn, prefix) == 0 and conn.xlen(f"{prefix}:jobs") == 0,
               30.0, "no pending or queued entries", [daemon])
    # every result is its job's and ok, and only jobs the daemon held at the
    # outage may have been answered twice (at least once, never lost)
    assert set(tally.counts) == set(ids)
    assert all(result["status"] == "ok" for result in tally.results.values())
    assert tally.duplicates <= WINDOW_MAX, tally.counts.most_common(3)
    assert daemon.stop() == 0, daemon.log()[-3000:]
    # (whether a reply was lost at all depends on what was on the wire at the pause)
    found = logged_total(daemon, r"found (\d+) jobs delivered")
    print(f"duplicates: {tally.duplicates}; jobs found in lost replies: {found}")
    conn.close()


def test_a_daemon_started_while_redis_is_down_waits_then_serves(
        daemon_factory: DaemonFactory, redis_server_factory: ServerFactory,
        prefix: str, images: Path, tiny_model: Path) -> None:
    # given no Redis yet
    server = redis_server_factory()
    server.stop()
    # when a daemon starts
    daemon = daemon_factory(serve_env(server, prefix, images, tiny_model,
                                      REDIS__MAX_BACKOFF_S="0.5"), start=False)
    daemon.start(wait_ready=False)
    daemon.wait_for_log("unavailable", timeout_s=120.0)
    # then it keeps trying without serving: three more tries reach the port
    # (a listener in Redis's stead, hanging up on each), and it is not ready
    with Doorstep(server.port) as doorstep:
        wait_until(lambda: doorstep.knocks >= 3, 60.0, "three more tries", [daemon])
        assert "serving " not in daemon.log()
    # and it serves once the server is there
    server.start()
    daemon.wait_for_log("serving ", timeout_s=60.0)
    conn = connect(server)
    tally = Tally(conn, f"{prefix}:results")
    with Client(RedisSettings(url=server.url, prefix=prefix)) as client:
        ids = client.submit_many(path_jobs(images, 20))
    tally.wait_for(ids, serving=[daemon])
    assert daemon.log().count("unavailable") == 1, daemon.log()[-3000:]
    conn.close()


# -- signals --------------------------------------------------------------------

def test_sigterm_drains_the_jobs_in_flight_and_leaves_the_rest_queued(
        daemon_factory: DaemonFactory, redis_server: RedisServer,
        prefix: str, images: Path, tiny_model: Path) -> None:
    # given a daemon busy with 500 jobs
    grace_s = 30.0
    daemon = daemon_factory(serve_env(redis_server, prefix, images, tiny_model,
                                      SERVE__DRAIN_GRACE_S=str(grace_s)))
    conn = connect(redis_server)
    tally = Tally(conn, f"{prefix}:results")
    with Client(RedisSettings(url=redis_server.url, prefix=prefix)) as client:
        ids = client.submit_many(path_jobs(images, 500))
    tally.wait_for_total(20)
    # when SIGTERM arrives
    daemon.signal(signal.SIGTERM)
    # then it exits 0 (a drain past the grace period would exit 1) ...
    assert daemon.wait(grace_s + 30) == 0, daemon.log()[-3000:]
    # ... with nothing pending, each job answered once or still queued, never both
    tally.read()
    left = unanswered_ids(conn, prefix)
    assert pending(conn, prefix) == 0
    assert tally.duplicates == 0
    assert sorted([*tally.counts, *left]) == sorted(ids)
    assert answered(daemon) == tally.total
    print(f"answered {tally.total}, left queued {len(left)}")
    conn.close()


def test_a_second_sigterm_during_the_drain_exits_at_once(
        daemon_factory: DaemonFactory, redis_server_factory: ServerFactory,
        prefix: str, images: Path, tiny_model: Path) -> None:
    # given a daemon busy with many jobs, and a Redis that stops answering, so
    # the drain cannot finish
    server = redis_server_factory()
    daemon = daemon_factory(serve_env(server, prefix, images, tiny_model,
                                      SERVE__DRAIN_GRACE_S="120"))
    conn = connect(server)
    tally = Tally(conn, f"{prefix}:results")
    with Client(RedisSettings(url=server.url, prefix=prefix)) as client:
        ids = client.submit_many(path_jobs(images, 3000), chunk=1000)
    tally.wait_for_total(50)
    with server.paused():
        # when SIGTERM starts a drain, and a second one arrives during it
        daemon.signal(signal.SIGTERM)
        daemon.wait_for_log("finishing the jobs in flight")
        assert daemon.process is not None and daemon.process.poll() is None
        daemon.signal(signal.SIGTERM)
        # then it exits at once, with a status that says it did not finish
        status = daemon.wait(20.0)
    assert status == 128 + signal.SIGTERM, daemon.log()[-3000:]
    assert "exiting now" in daemon.log()
    # and nothing is lost: each job is answered or still queued (pending ones
    # wait for another daemon to take them over), once Redis has run what the
    # daemon sent before the pause and let its connections go
    wait_until(lambda: only_client(conn), 30.0, "the daemon's connections to close")
    tally.read()
    assert sorted([*tally.counts, *unanswered_ids(conn, prefix)]) == sorted(ids)
    print(f"pending after the exit: {pending(conn, prefix)}")
    conn.close()


# -- several daemons, poison, a backlog -------------------------------------------

def test_two_daemons_in_one_group_share_the_jobs_without_duplicates(
        daemon_factory: DaemonFactory, redis_server: RedisServer,
        prefix: str, images: Path, tiny_model: Path) -> None:
    # given two daemons in one group, each with its own metrics port
    env = serve_env(redis_server, prefix, images, tiny_model)
    ports = [free_port(), free_port()]
    daemons = [daemon_factory({**env, "IMGPIPE_METRICS__PORT": str(port)}, start=False)
               for port in ports]
    for daemon in daemons:
        daemon.start(wait_ready=False)
    for daemon in daemons:
        daemon.wait_for_log("serving ", timeout_s=120.0)
    # when jobs arrive, 300 at a time, until each daemon has answered some
    # (which of them reads first is up to the scheduler; sharing is that both do)
    conn = connect(redis_server)
    tally = Tally(conn, f"{prefix}:results")
    ids: list[str] = []
    with Client(RedisSettings(url=redis_server.url, prefix=prefix)) as client:
        for wave in range(10):
            ids += client.submit_many(path_jobs(images, 300, tag=f"wave{wave}"))
            tally.wait_for(ids, serving=daemons)
            if all(jobs_finished(port) > 0 for port in ports):
                break
    assert all(jobs_finished(port) > 0 for port in ports), \
        f"one daemon answered all {len(ids)} jobs"
    # then, once both have stopped (no late result can come), every job has
    # exactly one result, and their shares add up to the jobs
    assert [daemon.stop() for daemon in daemons] == [0, 0]
    tally.read()
    assert tally.duplicates == 0 and set(tally.counts) == set(ids)
    shares = [answered(daemon) for daemon in daemons]
    assert all(share > 0 for share in shares) and sum(shares) == len(ids), shares
    print(f"shares: {shares}")
    conn.close()


def test_a_job_delivered_too_often_is_dead_lettered_and_can_be_retried(
        daemon_factory: DaemonFactory, redis_server: RedisServer,
        prefix: str, images: Path, tiny_model: Path) -> None:
    # given a job that a ghost consumer received max_deliveries (3) times, long ago
    conn = connect(redis_server)
    jobs, reply = f"{prefix}:jobs", f"{prefix}:results:poison"
    fields = {"v": "1", "image": "0.jpg", "id": "poison", "reply_to": reply}
    conn.xgroup_create(jobs, GROUP, id="0", mkstream=True)
    entry = conn.xadd(jobs, fields).decode()
    conn.xreadgroup(GROUP, "ghost", {jobs: ">"}, count=1)
    conn.xclaim(jobs, GROUP, "ghost", 0, [entry])
    conn.xclaim(jobs, GROUP, "ghost", 0, [entry], idle=3_600_000)  # an hour ago
    assert conn.xpending_range(jobs, GROUP, entry, entry, 1)[0]["times_delivered"] == 3
    # when a daemon with a short claim timeout starts
    daemon = daemon_factory(serve_env(redis_server, prefix, images, tiny_model,
                                      SERVE__CLAIM_IDLE_MS="1000",
                                      SERVE__RECLAIM_INTERVAL_S="0.5",
                                      SERVE__MAX_DELIVERIES="3"))
    poisoned = Tally(conn, reply)
    poisoned.wait_for(["poison"], serving=[daemon])
    # then the job is a dead letter, with its original fields and why
    dead = conn.xrange(f"{prefix}:dead")
    assert len(dead) == 1
    letter = {key.decode(): value.decode() for key, value in dead[0][1].items()}
    assert {key: letter[key] for key in fields} == fields
    assert letter["entry_id"] == entry and letter["deliveries"] == "3"
    assert '"too_many_deliveries"' in letter["error"]
    # and its client got an error result saying so
    result = poisoned.results["poison"]
    assert result["status"] == "error" and result["error"]["code"] == "too_many_deliveries"
    assert pending(conn, prefix) == 0 and conn.xlen(jobs) == 0
    # and the daemon serves on
    with Client(RedisSettings(url=redis_server.url, prefix=prefix)) as client:
        healthy = Tally(conn, f"{prefix}:results")
        healthy.wait_for(client.submit_many(path_jobs(images, 10)), serving=[daemon])
        # and once retried, the job is scored normally
        assert client.dead_retry() == 1
    poisoned.wait_for_total(2)
    retried = [contract.decode_result(fields) for _, fields in conn.xrange(reply)]
    assert retried[-1]["job_id"] == "poison" and retried[-1]["status"] == "ok", retried
    assert conn.xlen(f"{prefix}:dead") == 0
    conn.close()


def test_a_backlog_of_100000_jobs_is_read_a_window_at_a_time_in_flat_memory(
        daemon_factory: DaemonFactory, redis_server: RedisServer,
        prefix: str, images: Path, tiny_model: Path) -> None:
    # given 100,000 queued path jobs naming one small file
    conn = connect(redis_server)
    fields = contract.job_fields(image="0.jpg")
    pipe = conn.pipeline(transaction=False)
    for index in range(100_000):
        pipe.xadd(f"{prefix}:jobs", {**fields, "id": f"job-{index}"})
        if len(pipe) == 5000:
            pipe.execute()
    pipe.execute()
    # when a daemon serves them until it has answered 5,000 (sampled as it
    # goes: pending entries, results, the resident memory of its process tree)
    daemon = daemon_factory(serve_env(redis_server, prefix, images, tiny_model))
    process = psutil.Process(daemon.pid)
    samples: list[tuple[float, int, int, int]] = []  # (s, pending, answered, tree RSS)
    started = time.monotonic()

    def sampled() -> bool:
        samples.append((time.monotonic() - started, pending(conn, prefix),
                        conn.xlen(f"{prefix}:results"), tree_rss(process)))
        return samples[-1][2] >= 5000

    wait_until(sampled, 240.0, "5,000 results", [daemon])
    assert daemon.stop() == 0
    # then only a window's worth was ever pending, and memory did not grow
    # between the early results and the late ones (by progress, not by the
    # clock: a loaded machine only takes longer)
    print("\n".join(f"{s:5.1f} s: pending {p:4d}, answered {a:6d}, RSS {r / 2**20:6.1f} MiB"
                    for s, p, a, r in samples[::10]))
    assert max(p for _, p, _, _ in samples) <= WINDOW_MAX
    # (medians: a batch in flight moves a single sample by tens of MiB)
    early = statistics.median(r for _, _, a, r in samples if 1000 <= a < 2000)
    late = statistics.median(r for _, _, a, r in samples if a >= 4000)
    assert late <= early + RSS_MARGIN, (early / 2**20, late / 2**20)
    print(f"pending at most {max(p for _, p, _, _ in samples)}; RSS median "
          f"{early / 2**20:.0f} MiB early, {late / 2**20:.0f} MiB late")
    assert pending(conn, prefix) == 0
    assert conn.xlen(f"{prefix}:jobs") + conn.xlen(f"{prefix}:results") == 100_000
    conn.close()

