"""The daemon's Redis transport driven in-process: `StreamSource` reads jobs,
`ResultPublisher` answers them, against the suite's real redis-server.

The daemon tests (test_serve*.py) run the same code in a subprocess, where a
failure shows only as a lost or late job; here each promise of the consumer
and the publisher is checked by itself, and `make mutate` can see which test
reaches which function. No model runs: a test builds the records the engine
would hand the publisher.
"""

from __future__ import annotations

import logging
import re
import threading
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import pytest
import redis

from pipeline.config import ServeSettings
from pipeline.errors import ConfigError, TransientError
from pipeline.items import Job, Record
from pipeline.logs import UNFOLDED
from pipeline.metrics import Metrics
from pipeline.sources.urls import Prefix
from pipeline.transport import contract
from pipeline.transport.connection import Outage
from pipeline.transport.consumer import StreamSource
from pipeline.transport.contract import EXPIRED, JobRules, Keys
from pipeline.transport.publisher import (
    InFlight,
    ResultPublisher,
    Streams,
    entry_time_ms,
    queue_wait_ms,
)
from tests.integration.test_serve_hardening import _monitor, _transactions
from tests.redis_server import RedisServer
from tests.serve_daemon import wait_until

GROUP = "imgpipe"
CHUNK = 8
NOT_YET = 3_600_000  # a claim timeout no test reaches
ORIGIN = "http://images.example/"  # allowed for URL jobs; never fetched here
NODE_ENTRIES = 5  # stream-node-max-entries on the trimming tests' servers


@dataclass
class Transport:
    """One daemon's view of a prefix: its source, publisher and a plain connection."""

    source: StreamSource
    publisher: ResultPublisher
    conn: redis.Redis
    keys: Keys
    metrics: Metrics

    def add(self, count: int, **fields: str) -> list[str]:
        pipe = self.conn.pipeline()
        for index in range(count):
            pipe.xadd(self.keys.jobs, {"image": "red.png", "id": f"job-{index}", **fields})
        return [entry.decode() for entry in pipe.execute()]

    def reading_new_jobs(self) -> None:
        """Set up, read its own pending entries (none), and hold off take-over
        passes: every later read is of new jobs."""
        self.source.setup()
        assert self.source.next_chunk(0) == []
        self.source.next_reclaim = float("inf")

    def take(self, count: int) -> list[Job]:
        """Read until `count` jobs came out of the source."""
        taken: list[Job] = []

        def enough() -> bool:
            taken.extend(self.source.next_chunk(0) or [])
            return len(taken) >= count

        wait_until(enough, 30, f"{count} jobs from the source")
        return taken

    def answer(self, jobs: list[Job]) -> None:
        self.publisher.write([ok_record(job) for job in jobs])

    def pending(self, consumer: Optional[str] = None) -> list[str]:
        rows = self.conn.xpending_range(self.keys.jobs, GROUP, "-", "+", 1000,
                                        consumername=consumer)
        return [row["message_id"].decode() for row in rows]

    def results(self, stream: Optional[str] = None) -> list[dict[str, Any]]:
        return [contract.decode_result(fields)
                for _, fields in self.conn.xrange(stream or self.keys.results)]

    def consumers(self) -> dict[str, dict[str, Any]]:
        return {row["name"].decode(): row
                for row in self.conn.xinfo_consumers(self.keys.jobs, GROUP)}


def ok_record(job: Job) -> Record:
    assert job.ref is not None
    return Record(path=job.path, status="ok", ref=job.ref,
                  predictions=[{"label": "red", "class": 1, "score": 1.0}])


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return "transport-" + re.sub(r"[^A-Za-z0-9_.:-]", "_", request.node.name)


@pytest.fixture
def settings() -> dict[str, Any]:
    """ServeSettings for `make_transport`; a test changes them before building."""
    return {"claim_idle_ms": NOT_YET, "max_deliveries": 3}


@pytest.fixture
def make_transport(redis_server: RedisServer, prefix: str, tmp_path: Path,
                   settings: dict[str, Any]) -> Iterator[Any]:
    connections: list[redis.Redis] = []

    def make(consumer: str = "taker", conn: Optional[redis.Redis] = None,
             server: Optional[RedisServer] = None) -> Transport:
        conn = conn or redis.Redis.from_url((server or redis_server).url)
        connections.append(conn)
        cfg = ServeSettings(**settings)
        keys = Keys(prefix)
        streams = Streams(keys, GROUP, cfg.results_maxlen, cfg.dead_maxlen,
                          cfg.reply_stream_ttl_s)
        outage, in_flight, metrics = Outage("test", 0.2), InFlight(), Metrics()
        publisher = ResultPublisher(conn, streams, "tiny", in_flight, outage, metrics)
        rules = JobRules("tiny", cfg.max_topk, cfg.max_inline_bytes, [str(tmp_path)],
                         keys.results, keys.own_streams,
                         url_prefixes=(Prefix.parse(ORIGIN),),
                         outputs=("logits", "embedding", "both"))
        source = StreamSource(conn, streams, consumer, cfg, rules, CHUNK, in_flight,
                              publisher, outage)
        return Transport(source, publisher, conn, keys, metrics)

    yield make
    for conn in connections:
        conn.close()


def read_as(transport: Transport, consumer: str, count: int) -> list[str]:
    """Deliver `count` new entries to `consumer` (another daemon) directly."""
    reply = transport.conn.xreadgroup(GROUP, consumer, {transport.keys.jobs: ">"}, count=count)
    return [entry.decode() for _, entries in reply for entry, _ in entries]


def watch(server: RedisServer) -> list[dict[str, Any]]:
    """Every command `server` receives from now on, as MONITOR sees it."""
    seen: list[dict[str, Any]] = []
    watching = threading.Event()
    threading.Thread(target=_monitor, args=(server, seen, watching), daemon=True).start()
    assert watching.wait(10)
    return seen


def seen_so_far(transport: Transport, seen: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """The commands seen up to now: a marker command sent last has come through."""
    marker = f"marker-{time.monotonic_ns()}"
    transport.conn.set(marker, 1)
    wait_until(lambda: any(marker in c["command"] for c in list(seen)), 30, "the marker")
    return list(seen)


def idle_longer_than(transport: Transport, entry_ids: list[str], idle_ms: int) -> bool:
    rows = transport.conn.xpending_range(transport.keys.jobs, GROUP, "-", "+", 1000)
    idle = {row["message_id"].decode(): row["time_since_delivered"] for row in rows}
    return all(idle.get(entry_id, 0) > idle_ms for entry_id in entry_ids)


# -- the consumer group ----------------------------------------------------------

def test_setup_creates_the_group_from_the_start_of_a_stream_already_holding_jobs(
        make_transport: Any) -> None:
    # given jobs queued before any daemon ever ran
    transport = make_transport()
    queued = transport.add(3)
    # when the first daemon sets up
    transport.source.setup()
    # then the group starts at the stream's beginning: the queued jobs are read
    assert [job.ref for job in transport.take(3)] == queued


def test_setup_makes_the_stream_when_there_is_none(make_transport: Any) -> None:
    transport = make_transport()
    transport.source.setup()
    [group] = transport.conn.xinfo_groups(transport.keys.jobs)
    assert group["name"].decode() == GROUP


def test_setup_keeps_an_existing_group_where_it_is(make_transport: Any) -> None:
    # given a group that has already delivered and answered jobs
    first = make_transport()
    first.source.setup()
    first.add(2)
    first.answer(first.take(2))
    last_delivered = first.conn.xinfo_groups(first.keys.jobs)[0]["last-delivered-id"]
    # when another daemon sets up on the same stream
    second = make_transport("second")
    second.source.setup()
    # then the group is neither made again nor moved
    [group] = second.conn.xinfo_groups(second.keys.jobs)
    assert group["last-delivered-id"] == last_delivered


def test_another_applications_group_on_the_stream_is_not_taken_for_ours(
        make_transport: Any) -> None:
    transport = make_transport()
    transport.conn.xgroup_create(transport.keys.jobs, "audit", id="0", mkstream=True)
    queued = transport.add(1)
    transport.source.setup()
    names = {group["name"].decode() for group in transport.conn.xinfo_groups(transport.keys.jobs)}
    assert names == {"audit", GROUP}
    assert [job.ref for job in transport.take(1)] == queued


def test_setup_waits_for_an_unreachable_redis_until_stopped(
        make_transport: Any, redis_server_factory: Any) -> None:
    server = redis_server_factory()
    transport = make_transport(server=server)
    server.stop(kill=True)
    gave_up: list[TransientError] = []

    def set_up() -> None:
        try:
            transport.source.setup()
        except TransientError as exc:
            gave_up.append(exc)

    waiting = threading.Thread(target=set_up, daemon=True)
    waiting.start()
    wait_until(lambda: transport.source.outage.down, 30, "setup to meet the outage")
    transport.source.stop()
    waiting.join(30)
    assert not waiting.is_alive() and len(gave_up) == 1


class GroupMadeMeanwhile(redis.Redis):
    """Another daemon makes the group between this one's check and its XGROUP CREATE."""

    def xinfo_groups(self, name: Any) -> Any:
        try:
            return super().xinfo_groups(name)
        except redis.ResponseError:
            super().xgroup_create(name, GROUP, id="0", mkstream=True)
            raise


def test_two_daemons_making_the_group_at_once_both_start(
        make_transport: Any, redis_server: RedisServer) -> None:
    transport = make_transport(conn=GroupMadeMeanwhile.from_url(redis_server.url))
    transport.source.setup()
    [group] = transport.conn.xinfo_groups(transport.keys.jobs)
    assert group["name"].decode() == GROUP


def test_setup_against_a_redis_out_of_memory_starts_when_the_group_exists(
        make_transport: Any, redis_server_factory: Any) -> None:
    # given a server that refuses writes, XGROUP CREATE among them, and our group on it
    server = redis_server_factory()
    first = make_transport(server=server)
    first.source.setup()
    first.conn.config_set("maxmemory", 1)
    # when a daemon sets up
    second = make_transport(server=server)
    starting = threading.Thread(target=second.source.setup, daemon=True)
    starting.start()
    starting.join(30)
    # then it starts at once rather than waiting for memory
    second.source.stop()
    first.conn.config_set("maxmemory", 0)
    assert not starting.is_alive()


def test_a_stream_deleted_under_the_source_is_made_again_and_served(
        make_transport: Any, caplog: pytest.LogCaptureFixture) -> None:
    # given a source that has served, and then its stream deleted
    transport = make_transport()
    transport.source.setup()
    transport.add(1)
    transport.answer(transport.take(1))
    transport.conn.delete(transport.keys.jobs)
    # when it reads on
    assert transport.source.next_chunk(0) == []
    # then it says so, and the next read makes the group again and serves new jobs
    assert "is gone" in caplog.text and "creating it again" in caplog.text
    assert transport.source.next_chunk(0) == []
    assert transport.conn.xinfo_groups(transport.keys.jobs)[0]["name"].decode() == GROUP
    queued = transport.add(2)
    assert [job.ref for job in transport.take(2)] == queued


# -- reading ----------------------------------------------------------------------

def test_a_read_returns_at_most_one_chunk_of_jobs(make_transport: Any) -> None:
    transport = make_transport()
    transport.reading_new_jobs()
    transport.add(CHUNK + 3)
    sizes = [len(transport.source.next_chunk(0) or []) for _ in range(2)]
    assert sizes == [CHUNK, 3]


def test_a_job_read_carries_what_the_engine_needs_and_is_in_flight(
        make_transport: Any) -> None:
    transport = make_transport()
    transport.source.setup()
    [entry] = transport.add(1, topk="2", tta="hflip")
    [job] = transport.take(1)
    assert (job.ref, job.topk, job.tta, job.error) == (entry, 2, "hflip", None)
    assert job.path.endswith("red.png")
    assert entry in transport.source.in_flight
    assert transport.source.in_flight.get(entry).request.job_id == "job-0"


def test_a_url_job_and_the_output_it_asks_for_reach_the_engine(make_transport: Any) -> None:
    transport = make_transport()
    transport.source.setup()
    transport.conn.xadd(transport.keys.jobs, {"url": ORIGIN + "cat.jpg", "output": "both"})
    [job] = transport.take(1)
    assert (job.error, job.url, job.output) == (None, ORIGIN + "cat.jpg", "both")


def test_a_job_past_its_deadline_is_expired_and_one_before_it_is_not(
        make_transport: Any) -> None:
    transport = make_transport()
    transport.source.setup()
    now_ms = int(time.time() * 1000)
    transport.add(1, id="in-time", deadline_ms=str(now_ms + 600_000))
    transport.add(1, id="late", deadline_ms=str(now_ms - 1_000))
    jobs = transport.take(2)
    errors = {transport.source.in_flight.get(str(job.ref)).request.job_id: job.error
              for job in jobs}
    assert errors["in-time"] is None
    late = errors["late"]
    assert late is not None and late.code == EXPIRED


def test_an_inline_job_is_named_by_its_stream_entry(make_transport: Any) -> None:
    transport = make_transport()
    transport.source.setup()
    entry = transport.conn.xadd(transport.keys.jobs, {"data": b"\xff\xd8 not really"}).decode()
    [job] = transport.take(1)
    assert job.path == f"{transport.keys.jobs}/{entry}" and job.data == b"\xff\xd8 not really"


def test_a_malformed_job_comes_out_with_its_error_to_be_answered(make_transport: Any) -> None:
    transport = make_transport()
    transport.source.setup()
    transport.add(1, topk="many")
    [job] = transport.take(1)
    assert job.error is not None and job.error.code == "invalid_field"


def test_a_stopped_source_reads_nothing_more(make_transport: Any) -> None:
    transport = make_transport()
    transport.source.setup()
    transport.add(2)
    transport.source.stop()
    assert transport.source.next_chunk(0) is None
    assert transport.pending() == []


def test_a_read_waits_for_jobs_up_to_the_time_it_is_given(
        make_transport: Any, settings: dict[str, Any]) -> None:
    # given a source with nothing to read, waiting in a blocking read
    settings.update(read_block_ms=60_000)
    transport = make_transport()
    transport.reading_new_jobs()
    got: list[Optional[list[Job]]] = []
    reader = threading.Thread(target=lambda: got.append(transport.source.next_chunk(30.0)))
    reader.start()
    wait_until(lambda: "taker" in transport.consumers() and _blocked(transport), 30,
               "the read to block")
    # when a job arrives while it waits
    [entry] = transport.add(1)
    reader.join(30)
    # then that same read returns it
    assert [[job.ref for job in chunk or []] for chunk in got] == [[entry]]


def test_a_read_blocks_as_long_as_asked_within_read_block_ms_and_not_when_told_not_to(
        make_transport: Any, settings: dict[str, Any], redis_server_factory: Any) -> None:
    # Redis ends a blocked read on its timer tick: a read told not to wait must not block.
    settings.update(read_block_ms=100)
    server = redis_server_factory()
    seen = watch(server)
    transport = make_transport(server=server)
    transport.reading_new_jobs()
    for wait_s in (0, 0.0001, 0.05, 30):
        assert transport.source.next_chunk(wait_s) == []
    commands = [c["command"] for c in seen_so_far(transport, seen)]
    reads = [c for c in commands if c.startswith("XREADGROUP")][-4:]
    blocks = [re.search(r" BLOCK (\d+) ", c) for c in reads]
    assert [block and block.group(1) for block in blocks] == [None, "1", "50", "100"]


def _blocked(transport: Transport) -> bool:
    clients = transport.conn.client_list()
    return any(client.get("cmd") == "xreadgroup" and client.get("flags", "").count("b")
               for client in clients)


# -- a restart under the same name -----------------------------------------------

def test_a_restarted_consumer_runs_its_own_pending_jobs_first_page_by_page(
        make_transport: Any, caplog: pytest.LogCaptureFixture) -> None:
    # given a daemon that read CHUNK + 2 jobs and died before answering them
    before = make_transport()
    before.source.setup()
    held = before.add(CHUNK + 2)
    before.take(CHUNK + 2)
    newer = before.add(1)
    # when it starts again under the same consumer name
    caplog.set_level(logging.INFO, "imgpipe.serve")
    after = make_transport()
    after.source.setup()
    pages = [[job.ref for job in after.source.next_chunk(0) or []] for _ in range(3)]
    # then its own pending jobs come first, a chunk at a time, and then new ones
    assert pages == [held[:CHUNK], held[CHUNK:], []]
    assert f"re-read {CHUNK + 2} of this consumer's pending jobs" in caplog.text
    assert [job.ref for job in after.take(1)] == newer


def test_a_job_deleted_while_pending_is_acknowledged_and_not_run(
        make_transport: Any) -> None:
    # given a job answered by another daemon (deleted) while still pending with us
    before = make_transport()
    before.source.setup()
    [gone, kept] = before.add(2)
    before.take(2)
    before.conn.xdel(before.keys.jobs, gone)
    # when we restart and re-read our pending jobs
    after = make_transport()
    jobs = after.source.next_chunk(0)
    # then only the other one runs, and the deleted one is no longer pending
    assert [job.ref for job in jobs or []] == [kept]
    assert after.pending() == [kept]


def test_a_restart_counts_as_a_delivery_toward_the_dead_letter_limit(
        make_transport: Any, settings: dict[str, Any]) -> None:
    # given a job read by a daemon that died, max_deliveries times in a row
    settings["max_deliveries"] = 2
    first = make_transport()
    first.source.setup()
    [entry] = first.add(1)
    first.take(1)
    second = make_transport()
    assert [job.ref for job in second.source.next_chunk(0) or []] == [entry]
    # when it starts a third time
    third = make_transport()
    # then the job is not run again: it is a dead letter, answered and acknowledged
    assert third.source.next_chunk(0) == []
    [(_, letter)] = third.conn.xrange(third.keys.dead)
    assert letter[b"deliveries"] == b"2" and letter[b"entry_id"].decode() == entry
    assert third.pending() == [] and third.conn.xlen(third.keys.jobs) == 0


def test_delivery_counts_are_those_of_our_own_entries_among_another_consumers(
        make_transport: Any, settings: dict[str, Any]) -> None:
    # given our two jobs delivered three times, with another consumer's between them
    settings["max_deliveries"] = 2
    transport = make_transport()
    transport.source.setup()
    first, _, last = transport.add(3)
    read_as(transport, "taker", 1)
    read_as(transport, "other", 1)
    read_as(transport, "taker", 1)
    for _ in range(2):
        transport.conn.xclaim(transport.keys.jobs, GROUP, "taker", 0, [first, last])
    # when we restart and re-read our pending entries
    assert make_transport().source.next_chunk(0) == []
    # then both are dead letters: neither ran again
    letters = [fields[b"entry_id"].decode() for _, fields in transport.conn.xrange(
        transport.keys.dead)]
    assert letters == [first, last]


# -- a read whose reply was lost ---------------------------------------------------

class LosingReplies(redis.Redis):
    """A connection whose next XREADGROUP reaches Redis but whose reply is lost, as
    when the network fails between the server's answer and the client."""

    lose_next = False

    def xreadgroup(self, *args: Any, **kwargs: Any) -> Any:
        reply = super().xreadgroup(*args, **kwargs)
        if self.lose_next:
            self.lose_next = False
            raise redis.ConnectionError("reply lost")
        return reply


def test_jobs_delivered_in_a_lost_reply_run_without_waiting_for_the_claim_timeout(
        make_transport: Any, redis_server: RedisServer,
        caplog: pytest.LogCaptureFixture) -> None:
    # given jobs another daemon holds, a source with one job in flight, and its
    # next read delivering CHUNK more jobs in a reply that never arrives
    conn = LosingReplies.from_url(redis_server.url)
    transport = make_transport(conn=conn)
    transport.reading_new_jobs()
    transport.add(2)
    theirs = read_as(transport, "other", 2)
    [in_flight] = transport.add(1)
    assert [job.ref for job in transport.take(1)] == [in_flight]
    lost = transport.add(CHUNK)
    conn.lose_next = True
    assert transport.source.next_chunk(0) == []
    assert set(transport.pending("taker")) == {in_flight, *lost}
    # when it reads again once Redis answers (the claim timeout is an hour)
    found = transport.take(CHUNK)
    # then the lost jobs run, each once; the one in flight and the other daemon's
    # are not taken
    assert [job.ref for job in found] == lost
    assert transport.source.next_chunk(0) == []
    assert "found 8 jobs delivered to this consumer in a reply lost" in caplog.text
    assert transport.conn.xpending(transport.keys.jobs, GROUP)["pending"] == CHUNK + 3
    assert transport.pending("other") == theirs
    # and a second lost reply is found and counted by itself
    again = transport.add(3)
    conn.lose_next = True
    transport.source.next_chunk(0)
    assert [job.ref for job in transport.take(3)] == again
    assert transport.source.next_chunk(0) == []
    assert "found 3 jobs delivered to this consumer in a reply lost" in caplog.text


def test_a_lost_reply_behind_a_chunk_of_jobs_in_flight_is_found_page_by_page(
        make_transport: Any, redis_server: RedisServer) -> None:
    # given a chunk of jobs in flight, then a read whose reply is lost
    conn = LosingReplies.from_url(redis_server.url)
    transport = make_transport(conn=conn)
    transport.reading_new_jobs()
    transport.add(CHUNK)
    transport.take(CHUNK)
    lost = transport.add(CHUNK)
    conn.lose_next = True
    transport.source.next_chunk(0)
    # then the pending list is read a page at a time: the jobs in flight, then the lost
    found = [[job.ref for job in transport.source.next_chunk(0) or []] for _ in range(3)]
    assert found == [[], lost, []]


def test_jobs_already_answered_are_not_run_again_after_a_lost_reply(
        make_transport: Any, redis_server: RedisServer) -> None:
    # given a lost reply whose jobs another daemon answered (deleted) meanwhile
    conn = LosingReplies.from_url(redis_server.url)
    transport = make_transport(conn=conn)
    transport.reading_new_jobs()
    gone, kept = transport.add(2)
    conn.lose_next = True
    transport.source.next_chunk(0)
    transport.conn.xdel(transport.keys.jobs, gone)
    # then only the job still in the stream runs
    assert [job.ref for job in transport.take(1)] == [kept]


def test_an_unreachable_redis_is_an_empty_read_and_serving_goes_on_after(
        make_transport: Any, redis_server_factory: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    server = redis_server_factory()
    transport = make_transport(server=server)
    transport.source.setup()
    server.stop(kill=True)
    assert transport.source.next_chunk(0.05) == []
    assert transport.source.outage.down and "unavailable (ConnectionError" in caplog.text
    server.start()
    queued = transport.add(1)
    assert [job.ref for job in transport.take(1)] == queued
    assert not transport.source.outage.down and "is back" in caplog.text


def test_a_read_the_users_acl_denies_is_a_settings_error(
        make_transport: Any, redis_server_factory: Any) -> None:
    server = redis_server_factory()
    admin = redis.Redis.from_url(server.url)
    admin.acl_setuser("reader", enabled=True, passwords=["+pw"], keys=["other:*"],
                      categories=["+@all"])
    transport = make_transport(
        conn=redis.Redis.from_url(server.url, username="reader", password="pw"))
    with pytest.raises(ConfigError, match="not allowed"):
        transport.source.next_chunk(0)
    admin.close()


# -- taking over from dead consumers ---------------------------------------------

def test_jobs_idle_too_long_with_another_consumer_are_taken_over_once_per_interval(
        make_transport: Any, settings: dict[str, Any],
        caplog: pytest.LogCaptureFixture) -> None:
    # given jobs held by a consumer that stopped answering, past the claim timeout
    settings.update(claim_idle_ms=50, reclaim_interval_s=3600)
    transport = make_transport()
    transport.source.setup()
    transport.add(3)
    held = read_as(transport, "ghost", 3)
    wait_until(lambda: idle_longer_than(transport, held, 50), 30, "the claim timeout")
    # when the source makes its reclaim pass
    assert transport.source.next_chunk(0) == []  # its own pending entries: none
    taken = transport.source.next_chunk(0)
    # then it takes them over and says so
    assert [job.ref for job in taken or []] == held
    assert set(transport.pending("taker")) == set(held)
    assert "took over 3 jobs pending longer than 50 ms" in caplog.text
    # and no second pass comes before reclaim_interval_s, however idle others are
    more = transport.add(1)
    read_as(transport, "ghost", 1)
    wait_until(lambda: idle_longer_than(transport, more, 50), 30, "the claim timeout")
    assert [transport.source.next_chunk(0) for _ in range(3)] == [[], [], []]
    assert transport.pending("ghost") == more


def test_a_reclaim_pass_leaves_jobs_that_are_ours_and_in_flight(
        make_transport: Any, settings: dict[str, Any]) -> None:
    settings.update(claim_idle_ms=50)
    transport = make_transport()
    transport.reading_new_jobs()
    transport.add(2)
    mine = [job.ref for job in transport.take(2)]
    wait_until(lambda: idle_longer_than(transport, mine, 50), 30, "the claim timeout")
    transport.source.next_reclaim = 0.0
    assert transport.source.next_chunk(0) == []


def test_a_reclaim_pass_pages_through_a_long_pending_list_and_counts_each_pass(
        make_transport: Any, settings: dict[str, Any],
        caplog: pytest.LogCaptureFixture) -> None:
    settings.update(claim_idle_ms=50, reclaim_interval_s=3600)
    transport = make_transport()
    transport.source.setup()
    transport.add(CHUNK + 2)
    held = read_as(transport, "ghost", CHUNK + 2)
    wait_until(lambda: idle_longer_than(transport, held, 50), 30, "the claim timeout")
    transport.source.next_chunk(0)
    pages = [transport.source.next_chunk(0) or [] for _ in range(3)]
    assert [[job.ref for job in page] for page in pages] == [held[:CHUNK], held[CHUNK:], []]
    transport.answer(pages[0] + pages[1])
    # a later pass counts its own
    later = transport.add(1)
    read_as(transport, "ghost", 1)
    wait_until(lambda: idle_longer_than(transport, later, 50), 30, "the claim timeout")
    transport.source.next_reclaim = 0.0
    assert [job.ref for job in transport.source.next_chunk(0) or []] == later
    assert [r.getMessage() for r in caplog.records if "took over" in r.getMessage()] == [
        f"took over {CHUNK + 2} jobs pending longer than 50 ms",
        "took over 1 jobs pending longer than 50 ms"]


def test_a_reclaim_pass_moves_on_past_a_page_of_its_own_jobs_in_flight(
        make_transport: Any, settings: dict[str, Any]) -> None:
    # given a chunk of our own jobs in flight, idle past the claim timeout (a slow
    # batch), then jobs of a dead consumer
    settings.update(claim_idle_ms=50)
    transport = make_transport()
    transport.reading_new_jobs()
    transport.add(CHUNK)
    mine = [job.ref for job in transport.take(CHUNK)]
    transport.add(2)
    held = read_as(transport, "ghost", 2)
    wait_until(lambda: idle_longer_than(transport, mine + held, 50), 30, "the claim timeout")
    # when a reclaim pass reads its first page (ours: not run twice), and ours
    # grow idle past the timeout again before the next
    transport.source.next_reclaim = 0.0
    first = transport.source.next_chunk(0)
    wait_until(lambda: idle_longer_than(transport, mine, 50), 30, "the claim timeout")
    second = transport.source.next_chunk(0)
    # then the next page is the dead consumer's jobs, not ours again
    assert first == [] and [job.ref for job in second or []] == held


def test_the_end_of_a_reclaim_pass_forgets_consumers_long_gone_with_nothing_pending(
        make_transport: Any, settings: dict[str, Any]) -> None:
    # given a consumer idle ten claim timeouts with nothing pending, and one idle
    # a claim timeout only (with nine to spare for the pass to start)
    settings.update(claim_idle_ms=100)
    transport = make_transport()
    transport.source.setup()
    transport.conn.xgroup_createconsumer(transport.keys.jobs, GROUP, "gone")
    wait_until(lambda: transport.consumers()["gone"]["idle"] > 1000, 30, "ten claim timeouts")
    transport.conn.xgroup_createconsumer(transport.keys.jobs, GROUP, "recent")
    wait_until(lambda: transport.consumers()["recent"]["idle"] > 100, 30, "a claim timeout")
    # when the source makes a reclaim pass
    transport.source.next_chunk(0)  # its own pending entries: none
    transport.source.next_chunk(0)
    # then the long idle one is forgotten; the source and the other stay
    assert set(transport.consumers()) == {"taker", "recent"}


# -- leaving ------------------------------------------------------------------------

def test_a_consumer_with_nothing_pending_leaves_the_group(make_transport: Any) -> None:
    transport = make_transport()
    transport.source.setup()
    transport.add(1)
    transport.answer(transport.take(1))
    assert "taker" in transport.consumers()
    transport.source.leave()
    assert "taker" not in transport.consumers()


def test_a_consumer_holding_jobs_stays_so_they_can_be_taken_over(
        make_transport: Any) -> None:
    transport = make_transport()
    transport.source.setup()
    transport.add(1)
    transport.take(1)
    transport.source.leave()
    assert transport.consumers()["taker"]["pending"] == 1


def test_leaving_while_redis_is_down_is_logged_not_raised(
        make_transport: Any, redis_server_factory: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    server = redis_server_factory()
    transport = make_transport(server=server)
    transport.source.setup()
    server.stop(kill=True)
    caplog.set_level(logging.INFO, "imgpipe.serve")
    transport.source.leave()
    assert "could not remove consumer taker from the group" in caplog.text


# -- answering ------------------------------------------------------------------------

def test_a_batch_is_answered_acknowledged_and_deleted(make_transport: Any) -> None:
    transport = make_transport()
    transport.source.setup()
    transport.add(3)
    jobs = transport.take(3)
    transport.answer(jobs)
    results = transport.results()
    assert [r["job_id"] for r in results] == ["job-0", "job-1", "job-2"]
    assert [r["entry_id"] for r in results] == [job.ref for job in jobs]
    assert all(r["status"] == "ok" and r["model"] == "tiny" for r in results)
    assert transport.pending() == [] and transport.conn.xlen(transport.keys.jobs) == 0
    assert len(transport.publisher.in_flight) == 0 and transport.publisher.published == 3


def test_answering_is_counted_and_measured(make_transport: Any) -> None:
    transport = make_transport()
    transport.source.setup()
    transport.add(12)
    jobs = transport.take(12)
    transport.answer(jobs[:2])
    started = time.perf_counter()
    transport.answer(jobs[2:])
    elapsed_s = time.perf_counter() - started
    assert transport.publisher.published == 12
    # each job is observed once, with its share of its batch's write
    registry = transport.metrics.registry
    publish = {"stage": "publish"}
    assert registry.get_sample_value("imgpipe_stage_seconds_count", publish) == 12
    before = registry.get_sample_value("imgpipe_stage_seconds_sum", publish)
    transport.add(10)
    jobs = transport.take(10)
    started = time.perf_counter()
    transport.answer(jobs)
    elapsed_s = time.perf_counter() - started
    shares_s = registry.get_sample_value("imgpipe_stage_seconds_sum", publish) - before
    assert 0 < shares_s <= elapsed_s
    assert registry.get_sample_value("imgpipe_in_flight_jobs") == 0


def test_each_answer_goes_with_its_acknowledgement_in_one_transaction(
        make_transport: Any, redis_server_factory: Any) -> None:
    # given every command Redis receives
    server = redis_server_factory()
    seen = watch(server)
    transport = make_transport(server=server)
    transport.source.setup()
    transport.add(3)
    jobs = transport.take(3)
    # when a batch is answered
    transport.answer(jobs)
    # then one MULTI holds each job's result, XACK and XDEL
    transactions = _transactions(seen_so_far(transport, seen))
    [answer] = [t for t in transactions if any("XACK" in c for c in t)]
    for job in jobs:
        assert any(c.startswith("XACK") and c.endswith(str(job.ref)) for c in answer)
        assert any(c.startswith("XDEL") and c.endswith(str(job.ref)) for c in answer)
    assert sum(c.startswith(f"XADD {transport.keys.results}") for c in answer) == 3


def small_stream_nodes(redis_server_factory: Any) -> RedisServer:
    """A server of its own whose stream nodes hold NODE_ENTRIES entries, so that an
    approximate trim ("~") comes within that many of its target."""
    server: RedisServer = redis_server_factory()
    with redis.Redis.from_url(server.url) as conn:
        conn.config_set("stream-node-max-entries", NODE_ENTRIES)
    return server


def test_the_default_result_stream_is_trimmed_but_a_clients_own_is_not(
        make_transport: Any, settings: dict[str, Any], redis_server_factory: Any) -> None:
    # given results_maxlen 10 and stream nodes small enough for "~" to trim close to it
    settings.update(results_maxlen=10)
    transport = make_transport(server=small_stream_nodes(redis_server_factory))
    transport.source.setup()
    mine = f"{transport.keys.results}:mine"
    transport.add(40)
    transport.add(40, reply_to=mine)
    # when 80 jobs are answered
    jobs = transport.take(80)
    for start in range(0, 80, 20):
        transport.answer(jobs[start:start + 20])
    # then the default stream keeps about the last 10, the client's stream all 40
    assert 10 <= transport.conn.xlen(transport.keys.results) <= 10 + NODE_ENTRIES < 40
    assert transport.conn.xlen(mine) == 40


def test_a_private_reply_stream_expires_after_its_last_answer(
        make_transport: Any, settings: dict[str, Any]) -> None:
    settings.update(reply_stream_ttl_s=600)
    transport = make_transport()
    transport.source.setup()
    private, other = f"{transport.keys.results}:mine", "otherapp:events"
    transport.add(1, reply_to=private)
    transport.add(1, reply_to=other)
    transport.add(1)
    transport.answer(transport.take(3))
    assert 590 <= transport.conn.ttl(private) <= 600
    assert transport.conn.ttl(other) == -1 and transport.conn.ttl(transport.keys.results) == -1


def test_a_reply_stream_that_refuses_the_answer_sends_it_to_the_default_stream(
        make_transport: Any, caplog: pytest.LogCaptureFixture) -> None:
    # given a job whose reply_to is a key of another type
    transport = make_transport()
    transport.source.setup()
    transport.conn.set("otherapp:a-string", "x")
    transport.add(1, id="plain")
    transport.add(1, reply_to="otherapp:a-string", id="refused")
    # when it is answered in a batch, after another
    transport.answer(transport.take(2))
    # then its result lands on the default stream as an error naming the stream,
    # the other's as it was, and both jobs are acknowledged
    by_id = {r["job_id"]: r for r in transport.results()}
    refused = by_id["refused"]
    assert (refused["status"], refused["error"]["code"]) == ("error", "reply_failed")
    assert "otherapp:a-string" in refused["error"]["message"]
    assert refused["reply_to"] == "otherapp:a-string"
    assert by_id["plain"]["status"] == "ok"
    assert transport.pending() == [] and "cannot write the result of job refused" in caplog.text
    [line] = [r for r in caplog.records if "cannot write the result" in r.getMessage()]
    assert getattr(line, "job_id", None) == "refused"


def test_results_sent_to_the_default_stream_instead_are_trimmed_with_it(
        make_transport: Any, settings: dict[str, Any], redis_server_factory: Any) -> None:
    settings.update(results_maxlen=10)
    transport = make_transport(server=small_stream_nodes(redis_server_factory))
    transport.source.setup()
    transport.conn.set("otherapp:a-string", "x")
    transport.add(40, reply_to="otherapp:a-string")
    jobs = transport.take(40)
    for start in range(0, 40, 20):
        transport.answer(jobs[start:start + 20])
    assert 10 <= transport.conn.xlen(transport.keys.results) <= 10 + NODE_ENTRIES < 40


def test_answers_wait_for_redis_and_are_written_when_it_is_back(
        make_transport: Any, redis_server_factory: Any) -> None:
    # given jobs read, then Redis gone before their answers
    server = redis_server_factory()
    transport = make_transport(server=server)
    transport.source.setup()
    transport.add(2)
    jobs = transport.take(2)
    server.stop(kill=True)
    writer = threading.Thread(target=transport.answer, args=(jobs,))
    writer.start()
    wait_until(lambda: transport.publisher.outage.down, 30, "the writer to meet the outage")
    # when it is back (AOF kept the jobs)
    server.start()
    writer.join(60)
    # then the answers are written once and the jobs acknowledged
    assert [r["job_id"] for r in transport.results()] == ["job-0", "job-1"]
    assert transport.pending() == []


def test_acknowledging_nothing_sends_nothing(make_transport: Any,
                                             redis_server_factory: Any) -> None:
    server = redis_server_factory()
    transport = make_transport(server=server)
    server.stop(kill=True)
    transport.publisher.acknowledge([])  # would wait for Redis forever if it sent


# -- dead letters -------------------------------------------------------------------

def dead_letter_once(transport: Transport, deliveries: int, **fields: str) -> str:
    """Dead-letter one new job through the publisher."""
    [entry] = transport.add(1, **fields)
    read_as(transport, "ghost", 1)
    raw = transport.conn.xrange(transport.keys.jobs, entry, entry)[0][1]
    request = contract.parse_address(entry, raw, transport.source.rules)
    transport.publisher.dead_letter(request, raw, deliveries)
    return entry


def test_a_dead_letter_is_filed_answered_and_acknowledged_together(
        make_transport: Any, redis_server_factory: Any,
        caplog: pytest.LogCaptureFixture) -> None:
    server = redis_server_factory()
    seen = watch(server)
    transport = make_transport(server=server)
    transport.source.setup()
    entry = dead_letter_once(transport, 4, reply_to=f"{transport.keys.results}:mine")
    transactions = _transactions(seen_so_far(transport, seen))
    [letter] = [t for t in transactions if any("XACK" in c for c in t)]
    assert [c.split()[0] for c in letter] == ["XADD", "XADD", "XACK", "XDEL", "EXPIRE"]
    assert letter[0].startswith(f"XADD {transport.keys.dead}")
    assert letter[1].startswith(f"XADD {transport.keys.results}:mine")
    assert letter[2].endswith(entry) and letter[3].endswith(entry)
    assert transport.metrics.registry.get_sample_value("imgpipe_dead_letters_total") == 1
    [line] = [r for r in caplog.records if "dead-lettered" in r.getMessage()]
    assert getattr(line, "job_id", None) == "job-0"
    assert all(getattr(line, key) == value for key, value in UNFOLDED.items())
    result = transport.results(f"{transport.keys.results}:mine")[0]
    assert result["timings_ms"] == {"queue_wait": 0.0}


def test_the_dead_letter_stream_is_trimmed_to_about_dead_maxlen(
        make_transport: Any, settings: dict[str, Any]) -> None:
    settings.update(dead_maxlen=5)
    transport = make_transport()
    node = int(transport.conn.config_get("stream-node-max-entries")["stream-node-max-entries"])
    transport.source.setup()
    for _ in range(node + 20):
        dead_letter_once(transport, 4)
    assert 5 <= transport.conn.xlen(transport.keys.dead) <= 5 + node


def test_a_dead_letters_answer_refused_by_its_reply_stream_goes_to_the_default(
        make_transport: Any) -> None:
    transport = make_transport()
    transport.source.setup()
    transport.conn.set("otherapp:a-string", "x")
    entry = dead_letter_once(transport, 4, reply_to="otherapp:a-string")
    [result] = transport.results()
    assert (result["entry_id"], result["error"]["code"]) == (entry, "reply_failed")
    assert "too_many_deliveries" not in result["error"]["message"]
    assert transport.conn.xlen(transport.keys.dead) == 1 and transport.pending() == []


def test_a_dead_letter_whose_reply_stream_is_private_expires_it(
        make_transport: Any, settings: dict[str, Any]) -> None:
    settings.update(reply_stream_ttl_s=600)
    transport = make_transport()
    transport.source.setup()
    private = f"{transport.keys.results}:mine"
    dead_letter_once(transport, 4, reply_to=private)
    assert 590 <= transport.conn.ttl(private) <= 600


# -- entry ids --------------------------------------------------------------------

def test_the_time_a_job_was_queued_is_read_from_its_entry_id() -> None:
    assert entry_time_ms("1712345678901-7") == 1712345678901
    assert entry_time_ms("not-an-id") is None and entry_time_ms("") is None


def test_the_queue_wait_of_a_job_is_never_negative_or_unknown() -> None:
    import time

    now_ms = int(time.time() * 1000)
    assert queue_wait_ms(f"{now_ms + 60_000}-0") == 0.0  # a server clock ahead of ours
    assert queue_wait_ms("custom-id") == 0.0
    waited = queue_wait_ms(f"{now_ms - 5_000}-0")
    assert 5_000 <= waited < 60_000
