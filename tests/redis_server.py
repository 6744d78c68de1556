"""A throwaway redis-server for tests: its own port, directory and process.

Never the shared Redis on 6379. AOF is on, so `stop()` then `start()` (even
after kill -9) brings the same data back on the same port.

A pytest plugin (tests/conftest.py's pytest_plugins): every test may ask for
the `redis_server` and `redis_server_factory` fixtures without importing them.
"""

from __future__ import annotations

import ctypes
import ipaddress
import shutil
import signal
import socket
import ssl
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

import pytest

REDIS_SERVER = "redis-server"
START_TIMEOUT_S = 10.0
PR_SET_PDEATHSIG = 1
# Looked up here, not in the forked child, where only async-signal-safe work is safe.
_prctl = ctypes.CDLL(None, use_errno=True).prctl if sys.platform == "linux" else None


def _die_with_parent() -> None:
    """Run in the child before exec: SIGKILL the server when the thread that started
    it ends, so a test process killed outright (a hung mutant stopped by mutmut, a
    cancelled CI job) does not leave its servers running."""
    if _prctl is not None:
        _prctl(PR_SET_PDEATHSIG, signal.SIGKILL)


def server_popen(arguments: list[str]) -> subprocess.Popen[bytes]:
    """Start a server process that ends with the test process. Only from the main
    thread: the signal comes when the starting *thread* ends, and a helper
    thread's end must not take its server with it."""
    in_main = threading.current_thread() is threading.main_thread()
    return subprocess.Popen(arguments, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            preexec_fn=_die_with_parent if in_main else None)


def free_port() -> int:
    """A TCP port nothing listens on right now (closed again before returning)."""
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class RedisServer:
    """One redis-server subprocess on 127.0.0.1, data and log in `directory`."""

    def __init__(self, directory: Path, port: Optional[int] = None) -> None:
        executable = shutil.which(REDIS_SERVER)
        if executable is None:
            pytest.skip("redis-server is not installed (apt-get install redis-server)")
        self.executable = executable
        self.directory = directory
        self.port = port or free_port()
        self.process: Optional[subprocess.Popen[bytes]] = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> None:
        """Start (or restart, same port and directory) and wait until PING answers."""
        if self.process is not None and self.process.poll() is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        self.process = server_popen(
            [self.executable, *self.arguments(), "--bind", "127.0.0.1",
             "--dir", str(self.directory), "--save", "", "--appendonly", "yes",
             "--logfile", "redis.log", "--daemonize", "no"])
        self._wait_ready()

    def arguments(self) -> list[str]:
        """What the server listens on."""
        return ["--port", str(self.port)]

    def stop(self, kill: bool = False) -> None:
        """SIGTERM (a clean shutdown) or, with `kill`, SIGKILL; wait for the exit."""
        if self.process is None or self.process.poll() is not None:
            return
        self.resume()  # a stopped process cannot handle SIGTERM
        self.process.send_signal(signal.SIGKILL if kill else signal.SIGTERM)
        self.process.wait(timeout=10)

    def pause(self) -> None:
        """SIGSTOP: the port still accepts connections, nothing answers."""
        if self.process is not None:
            self.process.send_signal(signal.SIGSTOP)

    def resume(self) -> None:
        """SIGCONT after `pause` (harmless otherwise)."""
        if self.process is not None and self.process.poll() is None:
            self.process.send_signal(signal.SIGCONT)

    @contextmanager
    def paused(self) -> Iterator[None]:
        """SIGSTOP for the block; SIGCONT however it ends."""
        self.pause()
        try:
            yield
        finally:
            self.resume()

    def ping(self) -> bool:
        """True when the server answers PING with PONG (not LOADING)."""
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as conn:
                return self._pong(conn)
        except OSError:
            return False

    @staticmethod
    def _pong(conn: socket.socket) -> bool:
        conn.sendall(b"PING\r\n")
        return conn.recv(64).startswith(b"+PONG")

    def close(self) -> None:
        """Kill the server; the directory is left for pytest's tmp_path cleanup."""
        self.stop(kill=True)

    def _wait_ready(self) -> None:
        assert self.process is not None
        deadline = time.monotonic() + START_TIMEOUT_S
        while not self.ping():
            if self.process.poll() is not None or time.monotonic() > deadline:
                self.close()
                log = self.directory / "redis.log"
                tail = log.read_text(errors="replace")[-2000:] if log.exists() else ""
                raise RuntimeError(f"redis-server on port {self.port} did not start:\n{tail}")
            time.sleep(0.01)

    def __enter__(self) -> RedisServer:
        self.start()
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()


@dataclass(frozen=True)
class TlsFiles:
    """A private certificate authority and a server certificate it signed,
    for one host (PEM files)."""

    ca: Path
    cert: Path
    key: Path

    @classmethod
    def make(cls, directory: Path, host: str = "127.0.0.1") -> TlsFiles:
        """Made with the openssl command (the test is skipped without it), for
        `host` only: an IP address or a DNS name."""
        openssl = shutil.which("openssl")
        if openssl is None:
            pytest.skip("openssl is not installed (apt-get install openssl)")
        directory.mkdir(parents=True, exist_ok=True)
        files = cls(directory / "ca.pem", directory / "server.pem", directory / "server.key")
        kind = "IP" if _is_address(host) else "DNS"
        (directory / "san.cnf").write_text(f"subjectAltName={kind}:{host}\n")
        for command in (
                ["req", "-x509", "-newkey", "rsa:2048", "-nodes", "-days", "2",
                 "-subj", "/CN=imgpipe test CA", "-keyout", "ca.key", "-out", "ca.pem"],
                ["req", "-newkey", "rsa:2048", "-nodes", "-subj", f"/CN={host}",
                 "-keyout", "server.key", "-out", "server.csr"],
                ["x509", "-req", "-days", "2", "-in", "server.csr", "-CA", "ca.pem",
                 "-CAkey", "ca.key", "-CAcreateserial", "-extfile", "san.cnf",
                 "-out", "server.pem"]):
            subprocess.run([openssl, *command], cwd=directory, check=True,
                           capture_output=True, timeout=60)
        return files


def _is_address(host: str) -> bool:
    try:
        ipaddress.ip_address(host)
    except ValueError:
        return False
    return True


class TlsRedisServer(RedisServer):
    """A redis-server that speaks TLS only (rediss://), with a certificate for
    127.0.0.1 from the private CA `tls.ca`; clients need no certificate."""

    def __init__(self, directory: Path, tls: TlsFiles) -> None:
        super().__init__(directory)
        self.tls = tls

    @property
    def url(self) -> str:
        return f"rediss://127.0.0.1:{self.port}/0"

    def arguments(self) -> list[str]:
        return ["--port", "0", "--tls-port", str(self.port),
                "--tls-cert-file", str(self.tls.cert), "--tls-key-file", str(self.tls.key),
                "--tls-ca-cert-file", str(self.tls.ca), "--tls-auth-clients", "no"]

    def ping(self) -> bool:
        context = ssl.create_default_context(cafile=str(self.tls.ca))
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.5) as plain, \
                    context.wrap_socket(plain, server_hostname="127.0.0.1") as conn:
                return self._pong(conn)
        except OSError:
            return False


@pytest.fixture(scope="session")
def redis_server(tmp_path_factory: pytest.TempPathFactory) -> Iterator[RedisServer]:
    """One server for the whole session; tests must use their own key prefix."""
    with RedisServer(tmp_path_factory.mktemp("redis")) as server:
        yield server


@pytest.fixture
def redis_server_factory(tmp_path: Path) -> Iterator[Callable[[], RedisServer]]:
    """Dedicated, started servers for tests that kill or pause them; all closed after."""
    servers: list[RedisServer] = []

    def make() -> RedisServer:
        server = RedisServer(tmp_path / f"redis-{len(servers)}")
        servers.append(server)
        server.start()
        return server

    yield make
    for server in servers:
        server.close()
