"""The processes a benchmark starts for itself: a throwaway redis-server on a free
port (never the shared Redis on 6379), the real `imgpipe serve` daemon and a
Celery worker.
Adapted from tests/redis_server.py and tests/serve_daemon.py, without pytest.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

from benchmarks.harness import REPO, log

REDIS_START_TIMEOUT_S = 10.0
DAEMON_START_TIMEOUT_S = 120.0  # it loads and warms the model before it serves
READY_LINE = "serving "  # what the daemon logs once it reads jobs
METRICS_OFF = {"IMGPIPE_METRICS__PORT": "0"}  # no fixed metrics port


@dataclass
class RedisServer:
    process: subprocess.Popen[bytes]
    port: int

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"


@dataclass
class ServeDaemon:
    process: subprocess.Popen[bytes]
    log_path: Path

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""


@contextmanager
def redis_server(directory: Path, persistence: bool = True) -> Iterator[RedisServer]:
    """redis-server on 127.0.0.1, data and log in `directory`, AOF on as the tests
    run it (off with `persistence=False`: no fsync or background rewrite while jobs
    with inline images go through); killed on the way out."""
    executable = shutil.which("redis-server")
    if executable is None:
        raise RuntimeError("redis-server is not installed (apt-get install redis-server)")
    directory.mkdir(parents=True, exist_ok=True)
    port = free_port()
    process = subprocess.Popen(
        [executable, "--port", str(port), "--bind", "127.0.0.1", "--dir", str(directory),
         "--save", "", "--appendonly", "yes" if persistence else "no",
         "--logfile", "redis.log", "--daemonize", "no"],
        stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        wait_until(lambda: answers_ping(port), process, REDIS_START_TIMEOUT_S,
                   lambda: f"redis-server on port {port} did not start:\n"
                           f"{tail(directory / 'redis.log')}")
        yield RedisServer(process, port)
    finally:
        process.kill()
        process.wait(timeout=10)


@contextmanager
def running_daemon(env: dict[str, str], log_path: Path) -> Iterator[ServeDaemon]:
    """`imgpipe serve` (python -m workers.cli serve, IMGPIPE_* settings in `env`) in
    its own process group, once it logs READY_LINE; SIGTERM on the way out (exit 0
    expected), SIGKILL to its group if it hangs or the block fails."""
    started = time.perf_counter()
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(
            [sys.executable, "-m", "workers.cli", "serve"], stdout=log_file,
            stderr=subprocess.STDOUT, cwd=REPO, env={**os.environ, **METRICS_OFF, **env},
            start_new_session=True)
    daemon = ServeDaemon(process, log_path)
    try:
        wait_until(lambda: READY_LINE in daemon.log(), process, DAEMON_START_TIMEOUT_S,
                   lambda: f"imgpipe serve did not start:\n{tail(log_path)}")
        log(f"daemon ready after {time.perf_counter() - started:.1f} s (pid {process.pid})")
        yield daemon
        process.send_signal(signal.SIGTERM)
        status = process.wait(timeout=60)
        if status != 0:
            raise RuntimeError(f"imgpipe serve exited {status}:\n{tail(log_path)}")
    finally:
        if process.poll() is None:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


@contextmanager
def running_celery_worker(app: str, concurrency: int, name: str, env: dict[str, str],
                          log_path: Path) -> Iterator[subprocess.Popen[bytes]]:
    """`celery -A app worker` (prefork, `concurrency` processes, node `name`) in its
    own process group, once it logs that it is ready; SIGTERM (Celery's warm
    shutdown) on the way out, SIGKILL to its group if it hangs or the block fails."""
    command = [sys.executable, "-m", "celery", "-A", app, "worker", "--pool", "prefork",
               "--concurrency", str(concurrency), "--hostname", f"{name}@%h",
               "--loglevel", "INFO"]
    with open(log_path, "ab") as log_file:
        process = subprocess.Popen(command, stdout=log_file, stderr=subprocess.STDOUT,
                                   cwd=REPO, env=env, start_new_session=True)
    try:
        wait_until(lambda: " ready." in tail(log_path), process, DAEMON_START_TIMEOUT_S,
                   lambda: f"celery worker {name} did not start:\n{tail(log_path)}")
        yield process
        process.send_signal(signal.SIGTERM)
        process.wait(timeout=60)
    finally:
        with contextlib.suppress(ProcessLookupError):  # prefork children left behind too
            os.killpg(process.pid, signal.SIGKILL)
        process.wait(timeout=10)


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
    return log_path.read_text(errors="replace")[-chars:] if log_path.exists() else ""
