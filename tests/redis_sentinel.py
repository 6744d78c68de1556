"""Redis behind Sentinel for tests: a primary, a replica and three sentinels.

All on 127.0.0.1, each on a free port with its own directory under the test's
tmp_path, started by the `sentinel_set` fixture and killed after the test.
The sentinels judge a primary down after DOWN_AFTER_MS and may fail over
again after FAILOVER_TIMEOUT_MS, so a failover takes two or three seconds.
(Much less than a second, and the sentinels, reconnecting to a new primary,
may judge it down too before its first PING reply and fail over again. A
busy machine can still stall a new primary past the limit: tests ask the
sentinels which server is primary rather than assume it.)

A pytest plugin (tests/conftest.py's pytest_plugins): every test may ask for
`sentinel_set` without importing it; import only the helpers and types.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Optional

import pytest
import redis

from tests.redis_server import RedisServer, server_popen
from tests.serve_daemon import wait_until

SERVICE = "imgpipe-primary"
QUORUM = 2
DOWN_AFTER_MS = 2000
FAILOVER_TIMEOUT_MS = 4000
SETTLE_TIMEOUT_S = 60.0  # the sentinels finding each other and the replica


class ReplicaServer(RedisServer):
    """A redis-server that starts as a replica of `primary_port`."""

    def __init__(self, directory: Path, primary_port: int, port: Optional[int] = None) -> None:
        super().__init__(directory, port)
        self.primary_port = primary_port

    def arguments(self) -> list[str]:
        return [*super().arguments(), "--replicaof", "127.0.0.1", str(self.primary_port)]


class SentinelServer(RedisServer):
    """`redis-server --sentinel` with a generated sentinel.conf (which it rewrites)."""

    def __init__(self, directory: Path, primary_port: int, service: str) -> None:
        super().__init__(directory)
        self.primary_port = primary_port
        self.service = service

    def start(self) -> None:
        if self.process is not None and self.process.poll() is None:
            return
        self.directory.mkdir(parents=True, exist_ok=True)
        config = self.directory / "sentinel.conf"
        config.write_text("\n".join([
            f"port {self.port}", "bind 127.0.0.1", f"dir {self.directory}",
            "logfile sentinel.log",
            f"sentinel monitor {self.service} 127.0.0.1 {self.primary_port} {QUORUM}",
            f"sentinel down-after-milliseconds {self.service} {DOWN_AFTER_MS}",
            f"sentinel failover-timeout {self.service} {FAILOVER_TIMEOUT_MS}",
            f"sentinel parallel-syncs {self.service} 1", ""]))
        self.process = server_popen([self.executable, str(config), "--sentinel"])
        self._wait_ready()

    def client(self) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=self.port, socket_timeout=5.0,
                           decode_responses=True)


class SentinelSet:
    """A primary and a replica of it, watched by three sentinels as `service`."""

    def __init__(self, directory: Path, service: str = SERVICE) -> None:
        self.service = service
        self.primary = RedisServer(directory / "primary")
        self.replica = ReplicaServer(directory / "replica", self.primary.port)
        self.sentinels = [SentinelServer(directory / f"sentinel-{index}", self.primary.port,
                                         service) for index in range(3)]
        self.rejoined: list[RedisServer] = []

    def url(self, service: Optional[str] = None) -> str:
        """redis+sentinel:// for all three sentinels and `service` (ours by default)."""
        hosts = ",".join(f"127.0.0.1:{sentinel.port}" for sentinel in self.sentinels)
        return f"redis+sentinel://{hosts}/{service or self.service}"

    def start(self) -> None:
        """Start everything; return once the replica is in sync and every sentinel
        knows the replica and the other two sentinels (what a failover needs)."""
        self.primary.start()
        self.replica.start()
        for sentinel in self.sentinels:
            sentinel.start()
        wait_until(self._settled, SETTLE_TIMEOUT_S, "the sentinels to find the replica "
                   "and each other")

    def _settled(self) -> bool:
        if not in_sync(self.replica):
            return False
        for sentinel in self.sentinels:
            with sentinel.client() as conn:
                replicas = conn.sentinel_slaves(self.service)
                others = conn.sentinel_sentinels(self.service)
            if not any(int(r["port"]) == self.replica.port and not r["is_sdown"]
                       for r in replicas) or len(others) < len(self.sentinels) - 1:
                return False
        return True

    def primary_port(self) -> Optional[int]:
        """The primary's port as the first sentinel that answers names it."""
        for sentinel in self.sentinels:
            try:
                with sentinel.client() as conn:
                    address = conn.sentinel_get_master_addr_by_name(self.service)
            except redis.ConnectionError:
                continue
            return int(address[1]) if address else None
        return None

    def server_on(self, port: int) -> RedisServer:
        return next(server for server in (self.primary, self.replica) if server.port == port)

    def rejoin(self, server: RedisServer, primary_port: int) -> RedisServer:
        """Start a stopped `server` again (its port, directory and data) as a replica
        of `primary_port`, as an operator brings back a failed primary."""
        replica = ReplicaServer(server.directory, primary_port, server.port)
        self.rejoined.append(replica)
        replica.start()
        return replica

    def data_client(self, port: int) -> redis.Redis:
        return redis.Redis(host="127.0.0.1", port=port, socket_timeout=5.0)

    def close(self) -> None:
        for server in (*self.sentinels, *self.rejoined, self.replica, self.primary):
            server.close()


def in_sync(server: RedisServer) -> bool:
    """Whether `server` is a replica whose link to its primary is up and synced."""
    try:
        with redis.Redis(host="127.0.0.1", port=server.port, socket_timeout=2.0) as conn:
            info = conn.info("replication")
    except redis.ConnectionError:
        return False
    return (info.get("role") == "slave" and info.get("master_link_status") == "up"
            and not info.get("master_sync_in_progress"))


@pytest.fixture
def sentinel_set(tmp_path: Path) -> Iterator[SentinelSet]:
    """A started primary, replica and three sentinels, all killed after the test."""
    servers = SentinelSet(tmp_path / "sentinel-set")
    try:
        servers.start()
        yield servers
    finally:
        servers.close()
