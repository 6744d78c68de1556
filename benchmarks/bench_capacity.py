"""What one Redis can carry: its cost per job through imgpipe's own transport.

K processes run the daemon's real consumer and publisher (StreamSource,
ResultPublisher) with a null model in place of preprocessing and inference,
against a redis-server of the benchmark's own (no persistence), so that
Redis, not the model, is all that is measured. For each kind of job (a path,
and inline images of 16 KB, 110 KB and 1 MB) it reports, over submit (XADD
by the client), read (XREADGROUP) and answer (the result's MULTI: XADD,
XACK, XDEL): Redis CPU microseconds per job (INFO cpu), bytes in and out of
Redis per job (INFO stats), and Redis memory per queued job (used_memory
with the jobs queued, before any is read). Reading the results back is not
counted. URL jobs name a 110 KB image on a loopback HTTP server of the
benchmark's own, which each consumer downloads with imgpipe's URL fetcher
(its threads fetching a chunk's images at once, as a preprocessing worker
does) before answering: Redis carries only the URL.

    .venv/bin/python -m benchmarks.bench_capacity [--jobs N] [--processes K] [--quick]

Writes the table into benchmarks/README.md between the capacity markers and
the raw numbers to benchmarks/results/capacity-*.json.
"""

from __future__ import annotations

import multiprocessing
import os
import socket
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

import redis

from benchmarks import harness
from benchmarks.services import http_origin, redis_server
from pipeline.config import load_settings
from pipeline.items import Prepared
from pipeline.predictions import Prediction, ok_record
from pipeline.sources.urls import Prefix, UrlFetcher, UrlPolicy
from pipeline.transport.connection import Outage, connect, describe_url
from pipeline.transport.consumer import StreamSource
from pipeline.transport.contract import JobRules, Keys
from pipeline.transport.publisher import InFlight, ResultPublisher, Streams

KINDS = {"path": 0, "inline 16 KB": 16_000, "inline 110 KB": 110_000, "inline 1 MB": 1_000_000,
         "URL of a 110 KB image": 110_000}
PREFIX = "capacity"
MODEL = "null"
# What a real result carries: five predictions.
PREDICTIONS = [Prediction(index=i, label=f"class {i}", score=0.2) for i in range(5)]
IDLE_S = 2.0  # a consumer with nothing to read for this long has finished


def main() -> int:
    parser = harness.parser(__doc__, "1,000 jobs per kind")
    parser.add_argument("--jobs", type=int, default=20_000, help="jobs per kind (20000)")
    parser.add_argument("--processes", type=int, default=2, help="consumers (2)")
    args = parser.parse_args()
    jobs = 1_000 if args.quick else args.jobs
    started = time.perf_counter()
    info: dict[str, Any] = {"date": time.strftime("%Y-%m-%d %H:%M %Z"),
                            "machine": harness.machine(), "options": vars(args), "jobs": jobs}
    with tempfile.TemporaryDirectory(prefix="bench-capacity-") as scratch:
        image = Path(scratch) / "image.jpg"  # path jobs name it; nothing reads it
        image.write_bytes(b"\xff\xd8" + bytes(1000))
        with redis_server(Path(scratch) / "redis") as url, \
                http_origin(os.urandom(KINDS["URL of a 110 KB image"])) as origin:
            info["rows"] = []
            for kind, size in KINDS.items():
                harness.log(f"{kind}: {jobs:,} jobs")
                source = Source(image, size, origin if kind.startswith("URL") else None)
                info["rows"].append(measure(url, kind, source, jobs, args.processes))
    return harness.finish("capacity", args, info, started, table, block="capacity")


@dataclass(frozen=True)
class Source:
    """Where a kind's jobs point: a file path, inline bytes of `size`, or a URL."""

    image: Path  # path jobs name it; nothing reads it
    size: int
    origin: Optional[str] = None  # URL jobs: the loopback server's base URL

    def job(self, index: int, payload: bytes) -> dict[str, Any]:
        if self.origin is not None:
            return {"url": f"{self.origin}image.jpg?n={index}"}
        return {"data": payload} if self.size else {"image": str(self.image)}


def measure(url: str, kind: str, source: Source, jobs: int, processes: int) -> dict[str, Any]:
    """One kind of job: submitted, then drained by `processes` null consumers."""
    conn = redis.Redis.from_url(url)
    conn.flushall()
    before = snapshot(conn)
    submit(url, jobs, source)
    queued = snapshot(conn)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=consume, args=(url, source, n))
               for n in range(processes)]
    for worker in workers:
        worker.start()
    for worker in workers:
        worker.join()
    after = snapshot(conn)
    results = Keys(PREFIX).results
    answered = int(conn.xlen(results))
    # From the first result to the last, by their stream ids (milliseconds): the
    # consumers' start and idle wait at the end are not the transport's.
    first, last = (int(entries[0][0].split(b"-")[0])
                   for entries in (conn.xrange(results, count=1),
                                   conn.xrevrange(results, count=1)))
    drain_s = max(last - first, 1) / 1000
    conn.close()
    return {"kind": kind, "jobs": jobs, "answered": answered,
            "redis_us_per_job": (after["cpu_s"] - before["cpu_s"]) * 1e6 / jobs,
            "bytes_in_per_job": (after["in"] - before["in"]) / jobs,
            "bytes_out_per_job": (after["out"] - before["out"]) / jobs,
            "memory_per_queued_job": (queued["memory"] - before["memory"]) / jobs,
            "drain_jobs_per_s": answered / drain_s}


def snapshot(conn: redis.Redis) -> dict[str, float]:
    """Redis's own counters: CPU seconds, network bytes, memory in use."""
    cpu, stats, memory = conn.info("cpu"), conn.info("stats"), conn.info("memory")
    return {"cpu_s": float(cpu["used_cpu_sys"]) + float(cpu["used_cpu_user"]),
            "in": float(stats["total_net_input_bytes"]),
            "out": float(stats["total_net_output_bytes"]),
            "memory": float(memory["used_memory"])}


def submit(url: str, jobs: int, source: Source) -> None:
    from pipeline.transport.client import Client

    settings = load_settings(overrides={"redis.url": url, "redis.prefix": PREFIX})
    payload = os.urandom(source.size) if source.size and source.origin is None else b""
    with Client.from_settings(settings) as client:
        client.submit_many(source.job(index, payload) for index in range(jobs))


def consume(url: str, source: Source, number: int) -> None:
    """The daemon's read-answer loop with a null model, until the stream runs dry;
    URL jobs' images are downloaded first, a chunk at a time."""
    settings = load_settings(overrides={"redis.url": url, "redis.prefix": PREFIX})
    cfg, keys = settings.serve, Keys(PREFIX)
    client = connect(settings.redis, extra_timeout_s=cfg.read_block_ms / 1000)
    outage = Outage(describe_url(url), settings.redis.max_backoff_s)
    streams = Streams(keys, cfg.group, cfg.results_maxlen, cfg.dead_maxlen,
                      cfg.reply_stream_ttl_s)
    in_flight = InFlight()
    publisher = ResultPublisher(client, streams, MODEL, in_flight, outage)
    prefixes = (source.origin,) if source.origin else ()
    rules = JobRules(MODEL, cfg.max_topk, cfg.max_inline_bytes,
                     [os.path.realpath(source.image.parent)], keys.results, keys.own_streams,
                     url_prefixes=tuple(Prefix.parse(prefix) for prefix in prefixes))
    fetcher = UrlFetcher(UrlPolicy(prefixes, allow_private=True,
                                   threads=cfg.url_fetch_threads))
    jobs = StreamSource(client, streams, f"{socket.gethostname()}-{number}", cfg, rules,
                        settings.preprocess.chunk_size, in_flight, publisher, outage)
    jobs.setup()
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < IDLE_S:
        chunk = jobs.next_chunk(0.2)
        if chunk:
            fetches = [fetcher.submit(job.url) for job in chunk if job.url]
            if any(not fetch.result() for fetch in fetches):
                raise RuntimeError("a URL job's image did not download")
            publisher.write([ok_record(Prepared(job), MODEL, PREDICTIONS) for job in chunk])
            idle_since = time.monotonic()
    fetcher.close()
    client.close()


def table(info: dict[str, Any]) -> str:
    machine = info["machine"]
    lines = [f"Measured {info['date']} on {machine['cores']} cores ({machine['cpu']}), "
             f"1-minute load average {machine['load_average'][0]:.1f}: {info['jobs']:,} jobs "
             f"per kind, {info['options']['processes']} consumer processes, chunk size as "
             "configured; Redis without persistence.", "",
             "| job | Redis µs/job | one Redis core full at | bytes in / out per job "
             "| Redis memory per queued job | drained, jobs/s |",
             "|---|---:|---:|---:|---:|---:|"]
    for row in info["rows"]:
        per_job = row["redis_us_per_job"]
        lines.append(
            f"| {row['kind']} | {per_job:.1f} | ~{1e6 / per_job:,.0f} jobs/s "
            f"| {row['bytes_in_per_job']:,.0f} / {row['bytes_out_per_job']:,.0f} "
            f"| {row['memory_per_queued_job']:,.0f} B | {row['drain_jobs_per_s']:,.0f} |")
        if row["answered"] != row["jobs"]:
            lines.append(f"|  | answered {row['answered']} of {row['jobs']} | | | | |")
    return "\n".join(lines)


if __name__ == "__main__":
    sys.exit(main())
