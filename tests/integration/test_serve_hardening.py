"""`imgpipe serve` against hostile jobs and a hostile Redis: it keeps serving, and
no job is lost or answered with what it had no right to read.

A real redis-server and real daemons with the tiny model; the images are
plain colours, so a prediction tells which file was read.
"""

from __future__ import annotations

import contextlib
import json
import os
import re
import signal
import threading
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import redis
from PIL import Image

from pipeline.config import RedisSettings, ServeSettings
from pipeline.errors import TransientError
from pipeline.items import Job
from pipeline.transport import contract
from pipeline.transport.client import Client
from pipeline.transport.connection import Outage
from pipeline.transport.consumer import StreamSource
from pipeline.transport.contract import JobRules, Keys
from pipeline.transport.publisher import InFlight, ResultPublisher, Streams
from tests.integration.test_serve_faults import (
    GROUP,
    ServerFactory,
    Tally,
    connect,
    serve_env,
    unanswered_ids,
)
from tests.redis_server import RedisServer, TlsFiles, TlsRedisServer
from tests.serve_daemon import DaemonFactory, ServeProcess, wait_until

pytestmark = pytest.mark.slow

INSIDE, OUTSIDE = (220, 30, 30), (30, 30, 220)


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    return "hard-" + re.sub(r"[^A-Za-z0-9_.:-]", "_", request.node.name)


@pytest.fixture
def root(tmp_path: Path) -> Path:
    """An allowed root holding a red picture; a blue one lies outside it."""
    images = tmp_path / "images"
    images.mkdir()
    Image.new("RGB", (40, 30), INSIDE).save(images / "red.png")
    Image.new("RGB", (40, 30), OUTSIDE).save(tmp_path / "secret.png")
    return images


def top_label(result: dict[str, Any]) -> str:
    return str(result["predictions"][0]["label"])


def client_for(server: RedisServer, prefix: str) -> Client:
    return Client(RedisSettings(url=server.url, prefix=prefix))


# -- a job that used to kill every daemon ---------------------------------------

@pytest.mark.parametrize("path", ["/proc/1/exe", "/proc/2/exe"])
def test_a_job_naming_an_unreadable_link_is_answered_and_both_daemons_survive(
        daemon_factory: DaemonFactory, redis_server: RedisServer,
        prefix: str, tmp_path: Path, tiny_model: Path, path: str) -> None:
    # given two daemons whose allowed root is / (so /proc/... passes the prefix check)
    env = serve_env(redis_server, prefix, Path("/"), tiny_model)
    daemons = [daemon_factory(env), daemon_factory(env)]
    conn = connect(redis_server)
    # when a job names a link that cannot be read
    conn.xadd(f"{prefix}:jobs", {"image": path, "id": "poison"})
    # then it gets an error result naming the cause, and both daemons serve on
    results = Tally(conn, f"{prefix}:results")
    results.wait_for(["poison"], serving=daemons)
    error = results.results["poison"]["error"]
    assert results.results["poison"]["status"] == "error"
    assert error["code"] in ("permission_denied", "not_found", "not_an_image"), error
    picture = tmp_path / "ok.png"
    Image.new("RGB", (8, 8), INSIDE).save(picture)
    with client_for(redis_server, prefix) as client:
        jobs = [client.submit(data=picture.read_bytes()) for _ in range(4)]
    results.wait_for(jobs, serving=daemons)
    assert all(daemon.process is not None and daemon.process.poll() is None
               for daemon in daemons)
    conn.close()


def test_a_job_delivered_too_often_is_dead_lettered_without_being_parsed(
        redis_server: RedisServer, prefix: str, root: Path,
        monkeypatch: pytest.MonkeyPatch) -> None:
    # given a job that a ghost consumer received max_deliveries times
    conn = connect(redis_server)
    jobs = f"{prefix}:jobs"
    conn.xgroup_create(jobs, GROUP, id="0", mkstream=True)
    entry = conn.xadd(jobs, {"image": "red.png", "id": "killer"}).decode()
    conn.xreadgroup(GROUP, "ghost", {jobs: ">"}, count=1)
    for _ in range(2):
        conn.xclaim(jobs, GROUP, "ghost", 0, [entry], idle=3_600_000)
    # and a parser that dies on it, as a job that crashes whoever reads it would
    def crash(*args: object) -> None:
        raise SystemExit("the parser died")

    monkeypatch.setattr(contract, "parse_job", crash)
    source = _stream_source(redis_server, prefix, root)
    # when the source takes it over
    wait_until(lambda: source.next_chunk(0) == [] and conn.xlen(f"{prefix}:dead") == 1, 30,
               "the dead letter")
    # then it is a dead letter whose client was told, and it was never parsed
    [(_, letter)] = conn.xrange(f"{prefix}:dead")
    assert letter[b"entry_id"].decode() == entry
    # with the job's own fields, how often it was delivered, and why it is there
    assert (letter[b"image"], letter[b"id"], letter[b"deliveries"]) == (b"red.png", b"killer",
                                                                        b"3")
    error = json.loads(letter[b"error"])
    assert error["code"] == "too_many_deliveries" and "delivered 3 times" in error["message"]
    [(_, result)] = conn.xrange(f"{prefix}:results")
    decoded = contract.decode_result(result)
    assert (decoded["job_id"], decoded["error"]["code"]) == ("killer", "too_many_deliveries")
    assert decoded["status"] == "error"
    conn.close()


@pytest.mark.parametrize(("earlier", "dead"), [(2, False), (3, True)])
def test_the_last_allowed_delivery_runs_and_the_next_is_a_dead_letter(
        redis_server: RedisServer, prefix: str, root: Path, earlier: int, dead: bool) -> None:
    # given a job a ghost consumer received `earlier` times (max_deliveries is 3)
    conn = connect(redis_server)
    jobs = f"{prefix}:jobs"
    conn.xgroup_create(jobs, GROUP, id="0", mkstream=True)
    entry = conn.xadd(jobs, {"image": "red.png"}).decode()
    conn.xreadgroup(GROUP, "ghost", {jobs: ">"}, count=1)
    for _ in range(earlier - 1):
        conn.xclaim(jobs, GROUP, "ghost", 0, [entry], idle=3_600_000)
    source = _stream_source(redis_server, prefix, root)
    # when the source takes it over (delivery number earlier + 1)
    taken: list[Job] = []

    def taken_or_dead() -> bool:
        taken.extend(source.next_chunk(0) or [])
        return bool(taken) or conn.xlen(f"{prefix}:dead") > 0

    wait_until(taken_or_dead, 30, "the job or its dead letter")
    # then the third delivery runs the job, and a fourth files it as dead instead
    assert (conn.xlen(f"{prefix}:dead") == 1) is dead
    assert [job.ref for job in taken] == ([] if dead else [entry])
    conn.close()


def _stream_source(server: RedisServer, prefix: str, root: Path,
                   conn: redis.Redis | None = None) -> StreamSource:
    keys = Keys(prefix)
    cfg = ServeSettings(claim_idle_ms=10, max_deliveries=3)
    streams = Streams(keys, GROUP, cfg.results_maxlen, cfg.dead_maxlen)
    conn = conn or connect(server)
    outage, in_flight = Outage("test", 1.0), InFlight()
    publisher = ResultPublisher(conn, streams, "tiny", in_flight, outage)
    rules = JobRules("tiny", cfg.max_topk, cfg.max_inline_bytes, [str(root)], keys.results,
                     keys.own_streams)
    return StreamSource(conn, streams, "taker", cfg, rules, 8, in_flight, publisher, outage)


# -- reply_to may not name the daemon's own streams ------------------------------

def test_reply_to_the_jobs_or_dead_stream_is_refused_and_no_queued_job_is_lost(
        daemon_factory: DaemonFactory, redis_server: RedisServer,
        prefix: str, root: Path, tiny_model: Path) -> None:
    # given a queue of jobs with hostile reply_to fields among them, and a small
    # results_maxlen (which once trimmed the jobs stream itself)
    conn = connect(redis_server)
    jobs, mine = f"{prefix}:jobs", f"{prefix}:results:mine"
    hostile = {"at-jobs": jobs, "at-dead": f"{prefix}:dead"}
    with client_for(redis_server, prefix) as client:
        for job_id, target in hostile.items():
            client.submit("red.png", job_id=job_id, reply_to=target)
        queued = [client.submit("red.png", reply_to=mine) for _ in range(120)]
    # when a daemon serves them
    daemon = daemon_factory(serve_env(redis_server, prefix, root, tiny_model,
                                      SERVE__RESULTS_MAXLEN="10"))
    # then every queued job is answered, once, in its own stream
    answered = Tally(conn, mine)
    answered.wait_for(queued, serving=[daemon])
    assert answered.total == len(queued) and answered.duplicates == 0
    # and the hostile jobs got errors on the default stream, naming the field
    refused = Tally(conn, f"{prefix}:results")
    refused.wait_for(list(hostile), serving=[daemon])
    for job_id in hostile:
        error = refused.results[job_id]["error"]
        assert error["code"] == "invalid_field" and "reply_to" in error["message"], error
    # and nothing was written into the daemon's own streams
    assert conn.xlen(f"{prefix}:dead") == 0
    wait_until(lambda: conn.xlen(jobs) == 0, 60, "the jobs stream to empty", [daemon])
    conn.close()


def test_a_clients_own_reply_stream_is_never_trimmed(
        daemon_factory: DaemonFactory, redis_server: RedisServer,
        prefix: str, root: Path, tiny_model: Path) -> None:
    # given another application's stream holding 1,000 entries
    conn = connect(redis_server)
    events = f"otherapp-{prefix}:events"
    for start in range(0, 1000, 250):
        pipe = conn.pipeline()
        for index in range(start, start + 250):
            pipe.xadd(events, {"n": index})
        pipe.execute()
    daemon = daemon_factory(serve_env(redis_server, prefix, root, tiny_model,
                                      SERVE__RESULTS_MAXLEN="10"))
    # when a job names it as its reply stream
    with client_for(redis_server, prefix) as client:
        job = client.submit("red.png", reply_to=events)
    # then the result is added and nothing of what was there is cut
    wait_until(lambda: conn.xlen(events) > 1000, 120, "the result", [daemon])
    [(_, last)] = conn.xrevrange(events, count=1)
    assert contract.decode_result(last)["job_id"] == job
    assert conn.xlen(events) == 1001
    conn.close()


def test_the_default_result_stream_is_trimmed_to_about_results_maxlen(
        daemon_factory: DaemonFactory, redis_server: RedisServer,
        prefix: str, root: Path, tiny_model: Path) -> None:
    # given 600 queued jobs for the default result stream, and results_maxlen 50
    conn = connect(redis_server)
    results = f"{prefix}:results"
    node = int(conn.config_get("stream-node-max-entries")["stream-node-max-entries"])
    with client_for(redis_server, prefix) as client:
        ids = client.submit_many({"image": "red.png"} for _ in range(600))
    # when a daemon has answered every one of them
    daemon = daemon_factory(serve_env(redis_server, prefix, root, tiny_model,
                                      SERVE__RESULTS_MAXLEN="50"))
    wait_until(lambda: conn.xlen(f"{prefix}:jobs") == 0, 120, "every job answered", [daemon])
    assert daemon.stop() == 0, daemon.log()[-3000:]
    assert "stopped after answering 600 jobs" in daemon.log()
    # then the stream kept about the last 50 results, no fewer, and more only by
    # what trimming "~" leaves (Redis drops whole nodes of `node` entries)
    kept = [contract.decode_result(fields)["job_id"] for _, fields in conn.xrange(results)]
    assert 50 <= len(kept) <= 50 + node < len(ids), (len(kept), node)
    assert len(set(kept)) == len(kept) and set(kept) <= set(ids)
    conn.close()


def test_a_private_reply_stream_expires_after_its_last_result(
        daemon_factory: DaemonFactory, redis_server: RedisServer,
        prefix: str, root: Path, tiny_model: Path) -> None:
    # given a private reply stream that is not there when the result comes (its
    # caller gave up and deleted it), and the shared default stream
    daemon = daemon_factory(serve_env(redis_server, prefix, root, tiny_model,
                                      SERVE__REPLY_STREAM_TTL_S="600"))
    conn = connect(redis_server)
    private, shared = f"{prefix}:results:gone", f"{prefix}:results"
    with client_for(redis_server, prefix) as client:
        late = client.submit("red.png", reply_to=private)
        Tally(conn, private).wait_for([late], serving=[daemon])
        # then the stream the result made again expires, while the shared one does not
        assert 0 < conn.ttl(private) <= 600
        job = client.submit("red.png")
        Tally(conn, shared).wait_for([job], serving=[daemon])
        assert conn.ttl(shared) == -1
    conn.close()


# -- checking and opening a path are one step ------------------------------------

def test_a_link_swapped_under_path_jobs_never_serves_the_outside_file(
        daemon_factory: DaemonFactory, redis_server: RedisServer,
        prefix: str, root: Path, tiny_model: Path) -> None:
    # given the labels the model gives the inside and the outside picture
    daemon = daemon_factory(serve_env(redis_server, prefix, root, tiny_model))
    outside = root.parent / "secret.png"
    os.symlink(outside, root / "bait.png")
    conn = connect(redis_server)
    probes = Tally(conn, f"{prefix}:results")
    with client_for(redis_server, prefix) as client:
        inside_id = client.submit("red.png")
        outside_id = client.submit(data=outside.read_bytes())
        probes.wait_for([inside_id, outside_id], serving=[daemon])
        outside_label = top_label(probes.results[outside_id])
        assert top_label(probes.results[inside_id]) != outside_label
        # when 300 path jobs run while "bait.png" flips between a regular file inside
        # the root and a link to the outside file
        stop = threading.Event()
        flipper = threading.Thread(target=_flip, args=(root / "bait.png", outside, stop))
        flipper.start()
        try:
            reply = f"{prefix}:results:race"
            jobs = [client.submit("bait.png", reply_to=reply) for _ in range(300)]
            race = Tally(conn, reply)
            race.wait_for(jobs, serving=[daemon])
        finally:
            stop.set()
            flipper.join()
    # then no job was answered with the outside file's content
    outcomes = [race.results[job] for job in jobs]
    leaked = [r for r in outcomes if r["status"] == "ok" and top_label(r) == outside_label]
    assert not leaked, f"{len(leaked)} of 300 jobs read the file outside the root"
    refused = [r for r in outcomes if r["status"] == "error"]
    codes = Counter(r["error"]["code"] for r in refused)
    # (io_error: the link was swapped while its path was being resolved)
    assert set(codes) <= {"path_not_allowed", "not_found", "io_error"}, codes
    conn.close()


def _flip(bait: Path, outside: Path, stop: threading.Event) -> None:
    """Swap `bait` between a red file and a link to `outside`, atomically, until stopped."""
    red = bait.parent / "red.png"
    staging = bait.parent / ".staging"
    link = True
    while not stop.is_set():
        staging.unlink(missing_ok=True)
        if link:
            os.symlink(outside, staging)
        else:
            os.link(red, staging)
        os.replace(staging, bait)
        link = not link


# -- a Redis that refuses writes -------------------------------------------------

def test_a_redis_out_of_memory_mid_run_pauses_the_daemon_and_loses_nothing(
        daemon_factory: DaemonFactory, redis_server_factory: ServerFactory,
        prefix: str, root: Path, tiny_model: Path) -> None:
    # given a daemon serving a Redis of its own
    server = redis_server_factory()
    conn = connect(server)
    daemon = daemon_factory(serve_env(server, prefix, root, tiny_model))
    with client_for(server, prefix) as client:
        first = [client.submit("red.png") for _ in range(5)]
        results = Tally(conn, f"{prefix}:results")
        results.wait_for(first, serving=[daemon])
        # when Redis runs out of memory with jobs queued
        queued = [client.submit("red.png") for _ in range(40)]
        conn.config_set("maxmemory-policy", "noeviction")
        conn.config_set("maxmemory", "1")
        # then the daemon waits, saying why, instead of dying
        daemon.wait_for_log("OutOfMemoryError")
        # and once memory is freed, every job is answered
        conn.config_set("maxmemory", "0")
        results.wait_for(queued, serving=[daemon])
    assert conn.xlen(f"{prefix}:jobs") == 0
    assert results.duplicates == 0
    conn.close()


def test_a_daemon_starts_against_a_redis_out_of_memory_and_serves_once_it_is_freed(
        daemon_factory: DaemonFactory, redis_server_factory: ServerFactory,
        prefix: str, root: Path, tiny_model: Path) -> None:
    # given a queue and its group, in a Redis over its memory limit
    server = redis_server_factory()
    conn = connect(server)
    with client_for(server, prefix) as client:
        queued = [client.submit("red.png") for _ in range(10)]
    conn.xgroup_create(f"{prefix}:jobs", GROUP, id="0")
    conn.config_set("maxmemory-policy", "noeviction")
    conn.config_set("maxmemory", "1")
    # when a daemon starts, it gets ready (the group exists) and waits to publish
    daemon = daemon_factory(serve_env(server, prefix, root, tiny_model))
    daemon.wait_for_log("OutOfMemoryError")
    # then once memory is freed, all jobs are answered
    conn.config_set("maxmemory", "0")
    Tally(conn, f"{prefix}:results").wait_for(queued, serving=[daemon])
    conn.close()


def test_the_jobs_stream_deleted_under_a_daemon_is_created_again(
        daemon_factory: DaemonFactory, redis_server: RedisServer,
        prefix: str, root: Path, tiny_model: Path) -> None:
    # given a daemon blocked reading its jobs stream
    daemon = daemon_factory(serve_env(redis_server, prefix, root, tiny_model))
    conn = connect(redis_server)
    # when the stream is deleted (as a careless clean-up would)
    conn.delete(f"{prefix}:jobs")
    daemon.wait_for_log("creating it again")
    # then new jobs are served all the same
    with client_for(redis_server, prefix) as client:
        jobs = [client.submit("red.png") for _ in range(3)]
    Tally(conn, f"{prefix}:results").wait_for(jobs, serving=[daemon])
    conn.close()


class DeletingAfterAutoclaim(redis.Redis):
    """Deletes the stream right after the first XAUTOCLAIM: a clean-up elsewhere
    that lands between two commands of a reclaim pass, at a known moment."""

    deleted = False

    def xautoclaim(self, name: Any, *args: Any, **kwargs: Any) -> Any:
        reply = super().xautoclaim(name, *args, **kwargs)
        if not self.deleted:
            self.delete(name)
            self.deleted = True
        return reply


def test_the_jobs_stream_deleted_during_a_reclaim_pass_is_created_again(
        redis_server: RedisServer, prefix: str, root: Path,
        caplog: pytest.LogCaptureFixture) -> None:
    # given a source whose stream is deleted between XAUTOCLAIM and the
    # stale-consumer clean-up that ends the reclaim pass
    conn = connect(redis_server)
    jobs = f"{prefix}:jobs"
    source = _stream_source(redis_server, prefix, root,
                            DeletingAfterAutoclaim.from_url(redis_server.url))
    source.setup()
    # when it reads its own pending entries (none), then makes a reclaim pass
    assert source.next_chunk(0) == [] and source.next_chunk(0) == []
    # then it says so instead of failing, and serves new jobs from a new stream
    assert "creating it again" in caplog.text
    assert not conn.exists(jobs)
    entry = conn.xadd(jobs, {"image": "red.png"}).decode()
    taken: list[Job] = []

    def new_job_taken() -> bool:
        taken.extend(source.next_chunk(0) or [])
        return bool(taken)

    wait_until(new_job_taken, 30, "the job from the new stream")
    assert [job.ref for job in taken] == [entry]
    conn.close()


# -- leaving cleanly -------------------------------------------------------------

def test_a_daemon_that_stops_cleanly_leaves_the_consumer_group(
        daemon_factory: DaemonFactory, redis_server: RedisServer,
        prefix: str, root: Path, tiny_model: Path) -> None:
    daemon = daemon_factory(serve_env(redis_server, prefix, root, tiny_model,
                                      SERVE__CONSUMER="leaving"))
    conn = connect(redis_server)
    with client_for(redis_server, prefix) as client:
        job = client.submit("red.png")
        Tally(conn, f"{prefix}:results").wait_for([job], serving=[daemon])
        assert [c.name for c in client.status().consumers] == ["leaving"]
        assert daemon.stop() == 0
        assert client.status().consumers == []
    conn.close()


def test_a_drain_that_outlasts_its_grace_period_exits_1_and_loses_nothing(
        daemon_factory: DaemonFactory, redis_server_factory: ServerFactory,
        prefix: str, root: Path, tiny_model: Path) -> None:
    # given a daemon busy with a backlog, and a Redis that stops answering, so the
    # jobs in flight cannot be published
    server = redis_server_factory()
    daemon = daemon_factory(serve_env(server, prefix, root, tiny_model,
                                      SERVE__DRAIN_GRACE_S="1"))
    conn = connect(server)
    with client_for(server, prefix) as client:
        ids = client.submit_many({"image": "red.png", "job_id": f"job-{n}"} for n in range(3000))
    results = Tally(conn, f"{prefix}:results")
    results.wait_for_total(50)
    with server.paused():
        # when SIGTERM starts a drain that cannot finish within drain_grace_s
        daemon.signal(signal.SIGTERM)
        status = daemon.wait(60.0)
    # then the daemon exits 1, saying why, and every job is answered or still queued
    assert status == 1, daemon.log()[-3000:]
    assert "jobs still in flight after 1 s" in daemon.log()
    def accounted_for() -> bool:
        results.read()
        return sorted([*results.counts, *unanswered_ids(conn, prefix)]) == sorted(ids)

    # (waited for: a transaction the daemon sent just before the pause runs after it)
    wait_until(accounted_for, 30, "every job answered or queued")
    conn.close()


def test_each_result_its_ack_and_its_delete_go_in_one_transaction(
        daemon_factory: DaemonFactory, redis_server_factory: ServerFactory,
        prefix: str, root: Path, tiny_model: Path) -> None:
    # given every command a daemon sends, as Redis's MONITOR sees them
    server = redis_server_factory()
    daemon = daemon_factory(serve_env(server, prefix, root, tiny_model))
    conn = connect(server)
    seen: list[dict[str, Any]] = []
    watching = threading.Event()
    watcher = threading.Thread(target=_monitor, args=(server, seen, watching), daemon=True)
    watcher.start()
    watching.wait(10)
    # when it answers 30 jobs
    with client_for(server, prefix) as client:
        jobs = [client.submit("red.png") for _ in range(30)]
        Tally(conn, f"{prefix}:results").wait_for(jobs, serving=[daemon])
        client.submit("red.png", job_id="last")  # a marker: everything before it was seen
    wait_until(lambda: any("last" in c["command"] for c in list(seen)), 30, "the marker")
    # then each job's XACK stands in a MULTI/EXEC of one connection beside its XDEL
    # and the XADD of its result
    transactions = _transactions(list(seen))
    acked = {}
    for commands in transactions:
        for command in commands:
            if command.startswith("XACK"):
                acked[command.split()[-1]] = commands
    assert len(acked) >= 30, f"{len(acked)} acknowledgements inside transactions"
    for entry_id, commands in acked.items():
        assert any(c.startswith("XDEL") and c.endswith(entry_id) for c in commands)
        assert any(c.startswith(f"XADD {prefix}:results") for c in commands)
    conn.close()


def _monitor(server: RedisServer, seen: list[dict[str, Any]], watching: threading.Event) -> None:
    with connect(server).monitor() as monitor:
        watching.set()
        with contextlib.suppress(redis.ConnectionError):  # the server is killed at the end
            while True:
                seen.append(monitor.next_command())


def _transactions(commands: list[dict[str, Any]]) -> list[list[str]]:
    """The commands of each MULTI ... EXEC, per client connection."""
    open_: dict[str, list[str]] = {}
    done: list[list[str]] = []
    for command in commands:
        client, text = f"{command['client_address']}:{command['client_port']}", command["command"]
        if text == "MULTI":
            open_[client] = []
        elif text == "EXEC" and client in open_:
            done.append(open_.pop(client))
        elif client in open_:
            open_[client].append(text)
    return done


# -- fuzzing ---------------------------------------------------------------------

FIELD_NAMES = [b"v", b"image", b"data", b"id", b"model", b"topk", b"reply_to",
               b"deadline_ms", b"size", b"\xff\xfe", b"", b"IMAGE", b"data "]


def fuzzed_jobs(count: int, seed: int, prefix: str, photos: list[bytes]) -> Iterator[
        dict[bytes, bytes]]:
    """Jobs with random fields and values: real pictures mutated, binary garbage,
    hostile paths and reply streams, huge and negative numbers."""
    import random

    rng = random.Random(seed)
    values: list[Any] = [
        lambda: rng.choice(photos),
        lambda: _mutated(rng, rng.choice(photos)),
        lambda: rng.randbytes(rng.randint(0, 300)),
        lambda: rng.choice([b"red.png", b"../secret.png", b"/proc/1/exe", b"/etc/shadow",
                            b"red.png\x00x", b".", b"", b"missing.png", b"/proc/self/fd/0"]),
        lambda: str(rng.choice([-1, 0, 1, 3, 20, 21, 10**30])).encode(),
        lambda: rng.choice([f"{prefix}:jobs", f"{prefix}:dead", f"{prefix}:results:fuzz",
                            "bad name", "x" * 300]).encode(),
        lambda: b"1",
    ]
    for _ in range(count):
        fields = {rng.choice(FIELD_NAMES): rng.choice(values)()
                  for _ in range(rng.randint(0, 5))}
        if rng.random() < 0.5:  # about half look like real jobs
            fields[b"data"] = _mutated(rng, rng.choice(photos))
            fields.pop(b"image", None)
        yield fields or {b"nothing": b""}


def _mutated(rng: Any, data: bytes) -> bytes:
    damaged = bytearray(data)
    for _ in range(rng.randint(0, 12)):
        damaged[rng.randrange(len(damaged))] = rng.randrange(256)
    if rng.random() < 0.3:
        damaged = damaged[: rng.randint(0, len(damaged))]
    return bytes(damaged)


def test_thousands_of_random_jobs_each_get_exactly_one_answer_and_the_daemon_lives(
        daemon_factory: DaemonFactory, redis_server_factory: ServerFactory,
        prefix: str, root: Path, tiny_model: Path, samples_dir: Path) -> None:
    # given a Redis of its own (a random reply_to may name any stream), and real
    # pictures to mutate: a JPEG and a PNG
    server = redis_server_factory()
    photos = [(samples_dir / name).read_bytes() for name in ("coffee.jpg", "camera.png")]
    daemon = daemon_factory(serve_env(server, prefix, root, tiny_model,
                                      SERVE__MAX_INLINE_BYTES=str(2 * 1024 * 1024)))
    conn = connect(server)
    # when 2,000 random jobs arrive
    entries = []
    batch = conn.pipeline(transaction=False)
    for index, fields in enumerate(fuzzed_jobs(2000, seed=12, prefix=prefix, photos=photos)):
        batch.xadd(f"{prefix}:jobs", fields)  # type: ignore[arg-type]
        if index % 200 == 199:
            entries += [entry.decode() for entry in batch.execute()]
    # then each gets exactly one result, by its entry id, in some result stream
    wait_until(lambda: len(_answered(conn, prefix)) >= len(entries), 600,
               lambda: f"{len(entries)} results ({len(_answered(conn, prefix))} so far)",
               [daemon])
    assert sorted(_answered(conn, prefix)) == sorted(entries)
    assert conn.xlen(f"{prefix}:dead") == 0 and conn.xlen(f"{prefix}:jobs") == 0
    # and the daemon is still up and answers a good job
    with client_for(server, prefix) as client:
        good = client.submit(data=photos[0])
    tally = Tally(conn, f"{prefix}:results")
    tally.wait_for([good], serving=[daemon])
    assert tally.results[good]["status"] == "ok"
    assert "Traceback" not in daemon.log()
    conn.close()


def _answered(conn: redis.Redis, prefix: str) -> list[str]:
    """The entry ids that every result stream of the server (all streams but the
    queue and the dead letters) answers."""
    streams = [key for key in conn.scan_iter(_type="stream")
               if key.decode() not in (f"{prefix}:jobs", f"{prefix}:dead")]
    return [contract.decode_result(fields)["entry_id"]
            for stream in streams for _, fields in conn.xrange(stream)]


# -- chaos -------------------------------------------------------------------------

def chaos_jobs(count: int, photo: bytes, prefix: str) -> Iterator[tuple[dict[str, Any], bool]]:
    """Good path and inline jobs with hostile ones mixed in, each with its own id;
    with each, whether it is a good one."""
    hostile: list[dict[str, Any]] = [
        {"image": "/proc/1/exe"}, {"image": "../secret.png"}, {"image": "red.png\x00"},
        {"data": photo[: len(photo) // 3]}, {"data": b"\x89PNG garbage"},
        {"image": "red.png", "reply_to": f"{prefix}:jobs"}, {"image": "red.png", "topk": "-4"},
    ]
    for index in range(count):
        if index % 4 == 3:
            yield {"id": f"job-{index}", **hostile[index % len(hostile)]}, False
        else:
            yield {"id": f"job-{index}", **({"data": photo} if index % 2 else
                                            {"image": "red.png"})}, True


def test_chaos_daemons_and_redis_killed_in_turn_lose_no_job(
        daemon_factory: DaemonFactory, redis_server_factory: ServerFactory,
        prefix: str, root: Path, tiny_model: Path, samples_dir: Path) -> None:
    # given a Redis that fsyncs every write (so its kill -9 loses nothing acknowledged),
    # two daemons, and 600 jobs, a quarter of them hostile, queued 100 at a time
    server = redis_server_factory()
    conn = connect(server)
    conn.config_set("appendfsync", "always")
    jobs = list(chaos_jobs(600, (samples_dir / "coffee.jpg").read_bytes(), prefix))
    env = serve_env(server, prefix, root, tiny_model, SERVE__CLAIM_IDLE_MS="2000",
                    SERVE__RECLAIM_INTERVAL_S="0.5", REDIS__MAX_BACKOFF_S="0.5")
    daemons = [daemon_factory(env), daemon_factory(env)]
    results = Tally(conn, f"{prefix}:results")
    # when, after each hundred, once a few of them are answered, a daemon or Redis
    # is killed with SIGKILL, in turn
    for kill in range(6):
        pipe = conn.pipeline(transaction=False)
        for job, _ in jobs[kill * 100:(kill + 1) * 100]:
            pipe.xadd(f"{prefix}:jobs", job)
        pipe.execute()
        _wait_for_results(results, kill * 100 + 20, f"results before kill {kill + 1}")
        if kill % 2 == 0:  # each daemon twice, Redis three times, mid-run
            victim = kill // 2 % len(daemons)
            daemons[victim].kill()
            daemons[victim] = daemon_factory(env)
        else:
            server.stop(kill=True)
            server.start()
            conn.config_set("appendfsync", "always")
    # then every job is answered (at least once: a kill may repeat a few), the queue
    # empties, the daemons live, and every good job that was not dead-lettered scored
    wanted = {job["id"] for job, _ in jobs}
    wait_until(lambda: wanted <= _answered_ids(results), 300,
               lambda: f"all answers ({len(wanted - results.counts.keys())} missing)", daemons)
    wait_until(lambda: conn.xlen(f"{prefix}:jobs") == 0, 120, "an empty queue", daemons)
    outcomes = [results.results[job["id"]] for job, good in jobs if good]
    failed = [r for r in outcomes if r["status"] != "ok"
              and r["error"]["code"] != "too_many_deliveries"]
    assert not failed, failed[:3]
    conn.close()


def _wait_for_results(tally: Tally, total: int, what: str) -> None:
    wait_until(lambda: bool(_answered_ids(tally)) and tally.total >= total, 180, what)


def _answered_ids(tally: Tally) -> set[str]:
    """The job ids answered so far; while Redis restarts, those known before."""
    with contextlib.suppress(redis.ConnectionError):
        tally.read()
    return set(tally.counts)


# -- credentials and TLS ---------------------------------------------------------

SECRET = "pw-3b9e1f07-never-in-a-log"


def test_a_password_in_the_redis_url_never_reaches_the_daemons_log(
        daemon_factory: DaemonFactory, redis_server_factory: ServerFactory,
        prefix: str, root: Path, tiny_model: Path) -> None:
    # given a Redis that wants a password, and a daemon given it in its URL
    server = redis_server_factory()
    conn = connect(server)
    conn.config_set("requirepass", SECRET)  # this connection stays logged in
    url = f"redis://:{SECRET}@127.0.0.1:{server.port}/0"
    env = {**serve_env(server, prefix, root, tiny_model, REDIS__TIMEOUT_S="1"),
           "IMGPIPE_REDIS_URL": url}
    daemon = daemon_factory(env)
    tally = Tally(conn, f"{prefix}:results")
    with Client(RedisSettings(url=url, prefix=prefix)) as client:
        # when it serves jobs, good and bad, ...
        jobs = [client.submit("red.png"), client.submit("/etc/passwd"),
                client.submit(data=b"not an image")]
        tally.wait_for(jobs, serving=[daemon])
        # ... rides out an outage, ...
        with server.paused():
            daemon.wait_for_log("unavailable")
        daemon.wait_for_log("is back")
        jobs.append(client.submit("red.png"))
        tally.wait_for(jobs, serving=[daemon])
    # ... and stops
    assert daemon.stop() == 0, daemon.log()[-3000:]
    # then its log names the server by host and port, and never the password
    log = daemon.log()
    assert f"127.0.0.1:{server.port}" in log
    assert SECRET not in log and "redis://" not in log, log[-3000:]
    conn.close()


@pytest.mark.parametrize("user", [None, "imgpipe-worker"], ids=["default user", "ACL user"])
def test_a_password_file_and_an_acl_username_log_the_daemon_in(
        daemon_factory: DaemonFactory, redis_server_factory: ServerFactory,
        prefix: str, root: Path, tiny_model: Path, tmp_path: Path,
        user: str | None) -> None:
    # given a Redis that lets no one in without a password: either the default
    # user's, or an ACL user's (limited to the prefix's keys) while the default
    # user has another password
    server = redis_server_factory()
    conn = connect(server)
    if user is None:
        conn.config_set("requirepass", SECRET)
    else:
        conn.execute_command("ACL", "SETUSER", user, "on", f">{SECRET}", f"~{prefix}:*",
                             "+@all")
        conn.config_set("requirepass", "the-default-users-own-" + SECRET)
    stranger = redis.Redis.from_url(server.url)
    with pytest.raises(redis.AuthenticationError):
        stranger.ping()
    stranger.close()
    # and the password in a file, as `echo PASSWORD > FILE` writes it
    password_file = tmp_path / "redis.password"
    password_file.write_text(SECRET + "\n")
    credentials = {"IMGPIPE_REDIS__PASSWORD_FILE": str(password_file)}
    if user is not None:
        credentials["IMGPIPE_REDIS__USERNAME"] = user
    # when a daemon and a client use the file (and the username)
    daemon = daemon_factory({**serve_env(server, prefix, root, tiny_model), **credentials})
    settings = RedisSettings(url=server.url, prefix=prefix, username=user,
                             password_file=password_file)
    with Client(settings) as client:
        jobs = [client.submit("red.png") for _ in range(3)]
        # then they are logged in (as that user) and every job is answered
        results = client.wait(jobs, stream=client.keys.results, timeout_s=120)
        assert {job: result["status"] for job, result in results.items()} == \
            dict.fromkeys(jobs, "ok")
        own = conn.client_id()
        users = {entry["user"] for entry in conn.client_list() if int(entry["id"]) != own}
        assert users == {user or "default"}, users
    assert daemon.stop() == 0, daemon.log()[-3000:]
    assert SECRET not in daemon.log()
    conn.close()


def test_a_rediss_server_with_a_private_ca_is_served_through_tls_ca_file(
        daemon_factory: DaemonFactory, prefix: str, root: Path, tiny_model: Path,
        tmp_path: Path) -> None:
    # given a Redis that speaks TLS only, its certificate from a private CA
    tls = TlsFiles.make(tmp_path / "tls")
    with TlsRedisServer(tmp_path / "redis-tls", tls) as server:
        # (without the CA file, no client gets in: the certificate is not trusted)
        with Client(RedisSettings(url=server.url, prefix=prefix, timeout_s=5)) as stranger, \
                pytest.raises(TransientError):
            stranger.status()
        # when a daemon and a client are given the CA file
        env = {**serve_env(server, prefix, root, tiny_model),
               "IMGPIPE_REDIS__TLS_CA_FILE": str(tls.ca)}
        daemon = daemon_factory(env)
        settings = RedisSettings(url=server.url, prefix=prefix, tls_ca_file=tls.ca)
        with Client(settings) as client:
            jobs = [client.submit("red.png") for _ in range(3)]
            # then every job is answered over TLS
            results = client.wait(jobs, stream=client.keys.results, timeout_s=120)
        assert sorted(results) == sorted(jobs)
        assert all(result["status"] == "ok" for result in results.values())
        assert daemon.stop() == 0, daemon.log()[-3000:]


@pytest.mark.parametrize(("problem", "complaint"), [
    ("missing", "cannot read redis.tls_ca_file"),
    ("no certificate", "holds no usable CA certificate"),
    ("redis:// URL", "needs a rediss:// URL")])
def test_an_unusable_tls_ca_file_is_a_config_error(
        daemon_factory: DaemonFactory, prefix: str, root: Path, tiny_model: Path,
        tmp_path: Path, problem: str, complaint: str) -> None:
    # given a TLS Redis, and a daemon whose CA file does not exist, holds no
    # certificate, or comes with a URL that does not ask for TLS
    tls = TlsFiles.make(tmp_path / "tls")
    ca_file = _ca_file_with(problem, tls, tmp_path)
    with TlsRedisServer(tmp_path / "redis-tls", tls) as server:
        scheme = "redis://" if problem == "redis:// URL" else "rediss://"
        env = {**serve_env(server, prefix, root, tiny_model),
               "IMGPIPE_REDIS_URL": server.url.replace("rediss://", scheme),
               "IMGPIPE_REDIS__TLS_CA_FILE": str(ca_file)}
        daemon = _exited_or_waiting(daemon_factory(env, start=False))
        # then it exits 2 with one line naming the setting and the file
        assert daemon.process is not None and daemon.process.poll() == 2, daemon.log()[-3000:]
        [line] = _error_lines(daemon.log())
        assert complaint in line and "redis.tls_ca_file" in line and str(ca_file) in line


def _ca_file_with(problem: str, tls: TlsFiles, directory: Path) -> Path:
    """A CA file that is missing, or holds no certificate, or the right one (when
    the URL is what is wrong)."""
    if problem == "missing":
        return directory / "no-such-ca.pem"
    if problem == "no certificate":
        junk = directory / "junk-ca.pem"
        junk.write_text("not a certificate\n")
        return junk
    return tls.ca


OTHER_SECRET = "pw-other-5c1d2a90-never-in-a-log"  # a wrong one, or a new one


@pytest.mark.parametrize("refusal", ["wrong password", "unknown ACL user",
                                     "ACL user without the prefix's keys"])
def test_refused_credentials_or_keys_at_start_are_a_config_error(
        daemon_factory: DaemonFactory, redis_server_factory: ServerFactory,
        prefix: str, root: Path, tiny_model: Path, refusal: str) -> None:
    # given a Redis that wants a password, and a daemon whose password or user it
    # refuses, or whose ACL user may not touch the prefix's keys
    server = redis_server_factory()
    conn = connect(server)
    conn.execute_command("ACL", "SETUSER", "elsewhere", "on", f">{SECRET}", "~elsewhere:*",
                         "+@all")
    conn.config_set("requirepass", SECRET)  # this connection stays logged in
    credentials = {
        "wrong password": {"REDIS__PASSWORD": OTHER_SECRET},
        "unknown ACL user": {"REDIS__USERNAME": "nobody", "REDIS__PASSWORD": SECRET},
        "ACL user without the prefix's keys": {"REDIS__USERNAME": "elsewhere",
                                               "REDIS__PASSWORD": SECRET},
    }[refusal]
    daemon = _exited_or_waiting(daemon_factory(
        serve_env(server, prefix, root, tiny_model, **credentials), start=False))
    # then it exits 2 with one line saying why, and no password
    _assert_refused(daemon, server, "the user is not allowed" if "keys" in refusal
                    else "authentication failed")
    conn.close()


def test_a_password_changed_under_a_serving_daemon_is_a_config_error(
        daemon_factory: DaemonFactory, redis_server_factory: ServerFactory,
        prefix: str, root: Path, tiny_model: Path) -> None:
    # given a daemon serving a Redis that wants a password
    server = redis_server_factory()
    conn = connect(server)
    conn.config_set("requirepass", SECRET)  # this connection stays logged in
    daemon = daemon_factory(serve_env(server, prefix, root, tiny_model,
                                      REDIS__PASSWORD=SECRET))
    # when the password changes and its connections are dropped
    conn.config_set("requirepass", OTHER_SECRET)
    conn.client_kill_filter(_type="normal", skipme=True)
    # then, reconnecting, it exits 2 with one line saying why, and no password
    daemon.wait(timeout_s=60)
    _assert_refused(daemon, server, "authentication failed")
    conn.close()


def _exited_or_waiting(daemon: ServeProcess) -> ServeProcess:
    """Start `daemon` and wait until it exits or (wrongly) waits for Redis to be back."""
    daemon.start(wait_ready=False)
    assert daemon.process is not None
    wait_until(lambda: daemon.process.poll() is not None or "unavailable" in daemon.log(),
               120, "an exit or an outage", [])
    return daemon


def _error_lines(log: str) -> list[str]:
    assert "Traceback" not in log, log[-3000:]
    return [line for line in log.splitlines() if line.startswith("imgpipe: error: ")]


def _assert_refused(daemon: ServeProcess, server: RedisServer, reason: str) -> None:
    log = daemon.log()
    assert daemon.process is not None and daemon.process.poll() == 2, log[-3000:]
    [line] = _error_lines(log)
    assert f"Redis at 127.0.0.1:{server.port}: {reason}" in line, line
    assert SECRET not in log and OTHER_SECRET not in log, log[-3000:]
