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
counted. A URL job costs Redis what a path job of the same length does:
its download happens in a preprocessing worker, outside Redis.

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
from pathlib import Path
from typing import Any

import redis

from benchmarks import harness
from benchmarks.services import redis_server
from pipeline.config import load_settings
from pipeline.items import Prepared
from pipeline.predictions import Prediction, ok_record
from pipeline.transport.connection import Outage, connect, describe_url
from pipeline.transport.consumer import StreamSource
from pipeline.transport.contract import JobRules, Keys
from pipeline.transport.publisher import InFlight, ResultPublisher, Streams

KINDS = {"path": 0, "inline 16 KB": 16_000, "inline 110 KB": 110_000, "inline 1 MB": 1_000_000}
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
        with redis_server(Path(scratch) / "redis") as url:
            info["rows"] = []
            for kind, size in KINDS.items():
                harness.log(f"{kind}: {jobs:,} jobs")
                info["rows"].append(measure(url, kind, size, jobs, args.processes, image))
    return harness.finish("capacity", args, info, started, table, block="capacity")


def measure(url: str, kind: str, size: int, jobs: int, processes: int,
            image: Path) -> dict[str, Any]:
    """One kind of job: submitted, then drained by `processes` null consumers."""
    conn = redis.Redis.from_url(url)
    conn.flushall()
    before = snapshot(conn)
    submit(url, jobs, size, image)
    queued = snapshot(conn)
    context = multiprocessing.get_context("spawn")
    workers = [context.Process(target=consume, args=(url, str(image.parent), n))
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


def submit(url: str, jobs: int, size: int, image: Path) -> None:
    from pipeline.transport.client import Client

    settings = load_settings(overrides={"redis.url": url, "redis.prefix": PREFIX})
    payload = os.urandom(size) if size else b""
    with Client.from_settings(settings) as client:
        client.submit_many(({"data": payload} if size else {"image": str(image)})
                           for _ in range(jobs))


def consume(url: str, root: str, number: int) -> None:
    """The daemon's read-answer loop with a null model, until the stream runs dry."""
    settings = load_settings(overrides={"redis.url": url, "redis.prefix": PREFIX})
    cfg, keys = settings.serve, Keys(PREFIX)
    client = connect(settings.redis, extra_timeout_s=cfg.read_block_ms / 1000)
    outage = Outage(describe_url(url), settings.redis.max_backoff_s)
    streams = Streams(keys, cfg.group, cfg.results_maxlen, cfg.dead_maxlen,
                      cfg.reply_stream_ttl_s)
    in_flight = InFlight()
    publisher = ResultPublisher(client, streams, MODEL, in_flight, outage)
    rules = JobRules(MODEL, cfg.max_topk, cfg.max_inline_bytes, [os.path.realpath(root)],
                     keys.results, keys.own_streams)
    source = StreamSource(client, streams, f"{socket.gethostname()}-{number}", cfg, rules,
                          settings.preprocess.chunk_size, in_flight, publisher, outage)
    source.setup()
    idle_since = time.monotonic()
    while time.monotonic() - idle_since < IDLE_S:
        chunk = source.next_chunk(0.2)
        if chunk:
            publisher.write([ok_record(Prepared(job), MODEL, PREDICTIONS) for job in chunk])
            idle_since = time.monotonic()
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
