"""What confirming a submit with WAIT costs: `Client.submit_many` per chunk, on loopback.

Three set-ups, each with redis-servers of the benchmark's own (persistence off):
a primary alone (no WAIT, as before replication mattered), a primary with a
replica but `redis.submit_wait_replicas = 0` (no WAIT), and the same with 1
(each chunk's pipeline ends in WAIT 1). Reports the latency of one
submit_many call of CHUNK path jobs (one round trip, plus the wait for the
replica's acknowledgement), median and 90th percentile.

    .venv/bin/python -m benchmarks.bench_submit_wait [--chunks N] [--chunk JOBS]
"""

from __future__ import annotations

import argparse
import shutil
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Optional

import redis

from benchmarks.services import free_port
from pipeline.config import RedisSettings
from pipeline.transport.client import Client

START_TIMEOUT_S = 10.0
PREFIX = "wait-bench"
TRIM_EVERY = 20  # calls between emptying the jobs streams (memory stays small)


@contextmanager
def server(directory: Path, primary_port: Optional[int] = None) -> Iterator[int]:
    """A redis-server on loopback (a replica of `primary_port` if given); its port."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    replica = ["--replicaof", "127.0.0.1", str(primary_port)] if primary_port else []
    process = subprocess.Popen(
        [executable, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--save", "", "--appendonly", "no", *replica],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        conn = redis.Redis(port=port)
        deadline = time.monotonic() + START_TIMEOUT_S
        while not _ready(conn, bool(primary_port)):
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {port} did not start")
            time.sleep(0.05)
        yield port
    finally:
        process.kill()
        process.wait()


def _ready(conn: redis.Redis, replica: bool) -> bool:
    try:
        info = conn.info("replication")
    except redis.ConnectionError:
        return False
    return not replica or info.get("master_link_status") == "up"


def client(port: int, wait_replicas: int) -> Client:
    return Client(RedisSettings(url=f"redis://127.0.0.1:{port}/0", prefix=PREFIX,
                                submit_wait_replicas=wait_replicas))


def latencies_ms(clients: list[tuple[Client, int]], chunks: int,
                 chunk: int) -> list[list[float]]:
    """The wall time of each submit_many call of `chunk` path jobs, per client; the
    clients take turns, call by call, so that load on the machine hits all alike."""
    jobs = [{"image": f"images/{n:06d}.jpg"} for n in range(chunk)]
    for each, _ in clients:
        each.submit_many(jobs, chunk=chunk)  # warm: connection, replica decision
    latencies: list[list[float]] = [[] for _ in clients]
    for index in range(chunks):
        for (each, _), times in zip(clients, latencies, strict=True):
            started = time.perf_counter()
            each.submit_many(jobs, chunk=chunk)
            times.append((time.perf_counter() - started) * 1000)
        if index % TRIM_EVERY == 0:
            for _, port in clients:
                with redis.Redis(port=port) as conn:
                    conn.delete(f"{PREFIX}:jobs")
    return latencies


def main() -> None:
    parsed = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parsed.add_argument("--chunks", type=int, default=200)
    parsed.add_argument("--chunk", type=int, default=500)
    args = parsed.parse_args()
    names = ["primary alone, no WAIT", "primary + replica, submit_wait_replicas = 0",
             "primary + replica, submit_wait_replicas = 1"]
    with tempfile.TemporaryDirectory(prefix="bench-wait-") as tmp, \
            server(Path(tmp) / "alone") as alone, \
            server(Path(tmp) / "primary") as primary, \
            server(Path(tmp) / "replica", primary):
        clients = [(client(alone, 0), alone), (client(primary, 0), primary),
                   (client(primary, 1), primary)]
        rows = latencies_ms(clients, args.chunks, args.chunk)
        for each, _ in clients:
            each.close()
    print(f"| set-up ({args.chunk} path jobs per submit_many, {args.chunks} calls each) "
          "| median ms | p90 ms |")
    print("|---|---:|---:|")
    for name, latencies in zip(names, rows, strict=True):
        p90 = statistics.quantiles(latencies, n=10)[-1]
        print(f"| {name} | {statistics.median(latencies):.2f} | {p90:.2f} |")


if __name__ == "__main__":
    main()
