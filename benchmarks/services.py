"""The processes a benchmark starts for itself: a throwaway redis-server on a free
port (never the shared Redis on 6379), the real `imgpipe serve` daemon and a
Celery worker.
"""

from __future__ import annotations

import contextlib
import http.server
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from benchmarks.harness import REPO, log

REDIS_START_TIMEOUT_S = 10.0
START_TIMEOUT_S = 120.0  # a daemon or worker loads and warms its model first
READY_LINE = "serving "  # what imgpipe serve logs once it reads jobs
METRICS_OFF = {"IMGPIPE_METRICS__PORT": "0"}  # no fixed metrics port


@contextmanager
def redis_server(directory: Path) -> Iterator[str]:
    """redis-server on 127.0.0.1, data and log in `directory`, its URL; persistence
    off (no fsync or background rewrite while jobs with inline images go through);
    killed on the way out."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = subprocess.Popen(
        [executable, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--save", "", "--appendonly", "no", "--logfile", "redis.log", "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: answers_ping(port), process, REDIS_START_TIMEOUT_S,
                   lambda: f"redis-server on port {port} did not start:\n"
                           f"{tail(directory / 'redis.log')}")
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        process.kill()
        process.wait(timeout=10)


@contextmanager
def http_origin(body: bytes) -> Iterator[str]:
    """A loopback HTTP server answering every GET with `body` (HTTP/1.1, kept
    alive), its base URL; shut down on the way out."""

    class Handler(http.server.BaseHTTPRequestHandler):
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # noqa: N802 (http.server's name)
            self.send_response(200)
            self.send_header("Content-Type", "image/jpeg")
            self.send_header("Content-Length", str(len(body)))
            self.end_headers()
            self.wfile.write(body)

        def log_message(self, format: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    server.daemon_threads = True
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/"
    finally:
        server.shutdown()
        server.server_close()


@contextmanager
def running_daemon(env: dict[str, str], log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`imgpipe serve` (python -m workers.cli serve, IMGPIPE_* settings in `env`),
    once it logs READY_LINE; it must exit 0 on SIGTERM."""
    started = time.perf_counter()
    command = [sys.executable, "-m", "workers.cli", "serve"]
    with running(command, {**os.environ, **METRICS_OFF, **env}, log_path, READY_LINE,
                 "imgpipe serve") as process:
        log(f"daemon ready after {time.perf_counter() - started:.1f} s (pid {process.pid})")
        yield process


@contextmanager
def running_celery_worker(app: str, concurrency: int, name: str, env: dict[str, str],
                          log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`celery -A app worker` (prefork, `concurrency` processes, node `name`), once
    it logs that it is ready."""
    command = [sys.executable, "-m", "celery", "-A", app, "worker", "--pool", "prefork",
               "--concurrency", str(concurrency), "--hostname", f"{name}@%h",
               "--loglevel", "INFO"]
    with running(command, env, log_path, " ready.", f"celery worker {name}") as process:
        yield process


@contextmanager
def running(command: list[str], env: dict[str, str], log_path: Path, ready: str,
            name: str) -> Iterator[subprocess.Popen[bytes]]:
    """`command` in its own process group, output to `log_path`, once `ready` is in
    that log; SIGTERM on the way out (a warm shutdown; exit 0 expected), SIGKILL to
    the whole group (children left behind too) if it hangs or the block fails."""
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                   cwd=REPO, env=env, start_new_session=True)
    try:
        wait_until(lambda: ready in tail(log_path, 100_000), process, START_TIMEOUT_S,
                   lambda: f"{name} did not start:\n{tail(log_path)}")
        yield process
        process.send_signal(signal.SIGTERM)
        if process.wait(timeout=60) != 0:
            raise RuntimeError(f"{name} exited {process.returncode}:\n{tail(log_path)}")
    finally:
        with contextlib.suppress(ProcessLookupError):
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


def submit_and_wait(client: Any, jobs: list[dict[str, Any]],
                    timeout_s: float) -> dict[str, dict[str, Any]]:
    """imgpipe serve jobs sent at once (Client.submit_many) to one fresh reply stream,
    and every result read from it (Client.wait); all must be ok."""
    reply = client.reply_stream()
    ids = client.submit_many({**job, "reply_to": reply} for job in jobs)
    found: dict[str, dict[str, Any]] = client.wait(ids, stream=reply, timeout_s=timeout_s)
    client.delete_stream(reply)
    failed = [r for r in found.values() if r.get("status") != "ok"]
    if len(found) != len(ids) or failed:
        raise RuntimeError(f"serve: {len(found)} of {len(ids)} results, {len(failed)} not ok: "
                           f"{failed[:2]}")
    return found


def free_port() -> int:
    """A TCP port nothing listens on right now (closed again before returning)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def answers_ping(port: int) -> bool:
    """True when Redis on `port` answers PING with PONG (not LOADING)."""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as conn:
            conn.sendall(b"PING\r\n")
            return conn.recv(64).startswith(b"+PONG")
    except OSError:
        return False


def wait_until(ready: Callable[[], bool], process: subprocess.Popen[bytes],
               timeout_s: float, failed: Callable[[], str]) -> None:
    """Poll `ready`; raise with `failed()` if `process` exits first or time runs out."""
    deadline = time.monotonic() + timeout_s
    while not ready():
        if process.poll() is not None or time.monotonic() > deadline:
            raise RuntimeError(failed())
        time.sleep(0.01)


def tail(log_path: Path, chars: int = 2000) -> str:
    """The end of a log file ("" while there is none)."""
    return log_path.read_text(errors="replace")[-chars:] if log_path.exists() else ""
