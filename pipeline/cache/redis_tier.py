"""The shared tier: entries in Redis with a TTL, for every host of a fleet.

Redis is an optimisation here, never a dependency: socket timeouts are short,
redis-py's own retries are off, and when the server is unreachable (at start
or mid-run) the tier logs one warning, reports misses, skips writes and tries
the server again at most once every `retry_interval_s`. While it is down a
call costs one clock read. No redis exception ever reaches the caller, and
only host:port is ever logged, never the URL (it may hold a password).

The tier's keys are the string keys under `<prefix>:cache:` that parse as
cache keys; listing, counting and clearing look at nothing else, so a job
queue sharing the server and the prefix is never touched (SCAN's TYPE
filter: Redis 6.0 or later).
"""

from __future__ import annotations

import contextlib
import logging
import re
import threading
import time
from collections.abc import Callable, Iterable, Iterator
from typing import Optional, TypeVar

import redis

from pipeline.cache import LOGGER_NAME, TierStats
from pipeline.cache.keys import namespace, parse_key
from pipeline.config import RedisSettings
from pipeline.transport.connection import OUTAGE_ERRORS, connect, describe_url

log = logging.getLogger(LOGGER_NAME)

DEFAULT_TIMEOUT_S = 0.5
DEFAULT_RETRY_INTERVAL_S = 5.0
SCAN_BATCH = 1000
T = TypeVar("T")


class RedisTier:
    """Entries under `prefix` in the Redis `server` (a URL, or settings with
    credentials and TLS), each expiring after `ttl_s`."""

    name = "redis"

    def __init__(self, server: str | RedisSettings, prefix: str, ttl_s: int,
                 max_entry_bytes: int, *, retry_interval_s: float = DEFAULT_RETRY_INTERVAL_S
                 ) -> None:
        if ttl_s < 1 or max_entry_bytes < 1 or retry_interval_s < 0:
            raise ValueError("ttl_s and max_entry_bytes must be positive, "
                             "retry_interval_s not negative")
        if isinstance(server, str):
            server = RedisSettings(url=server, timeout_s=DEFAULT_TIMEOUT_S)
        self.location = describe_url(server.url)
        self.prefix = prefix
        self.ttl_s = ttl_s
        self.max_entry_bytes = max_entry_bytes
        self.retry_interval_s = retry_interval_s
        self.stats = TierStats()
        self._client = connect(server, health_check_interval_s=0)
        self._lock = threading.Lock()
        self._down = False
        self._next_probe = 0.0  # monotonic time of the next try while down
        self._closed = False

    def setup(self) -> bool:
        """PING the server now, so an outage is reported at start; True when up."""
        ok, _ = self._attempt(lambda client: client.ping())
        return ok

    def get(self, key: str) -> bytes | None:
        """The stored bytes, or None on a miss or while the server is down."""
        ok, value = self._attempt(lambda client: client.get(key))
        if ok and isinstance(value, bytes):
            self.stats.bump(hits=1, bytes_read=len(value))
            return value
        self.stats.bump(misses=1)
        return None

    def set(self, key: str, value: bytes) -> None:
        """SET with EX ttl_s; entries over `max_entry_bytes` are not written."""
        if len(value) > self.max_entry_bytes:
            self.stats.bump(skipped=1)
            return
        ok, _ = self._attempt(lambda client: client.set(key, value, ex=self.ttl_s))
        if ok:
            self.stats.bump(bytes_written=len(value))
        else:
            self.stats.bump(skipped=1)

    def delete(self, key: str) -> None:
        """Remove `key` if present."""
        self._attempt(lambda client: client.delete(key))

    def iter_keys(self) -> Iterator[str]:
        """Every cache key under the prefix (SCAN: no blocking KEYS on a shared server)."""
        _, keys = self._attempt(self._scan_all)
        return iter(keys or [])

    def entry_count(self) -> int:
        """How many cache keys are under the prefix."""
        return sum(1 for _ in self.iter_keys())

    def volume_bytes(self) -> int:
        """The total length of the values under the prefix (not Redis overhead)."""
        _, total = self._attempt(self._sum_lengths)
        return total or 0

    def clear(self) -> int:
        """Delete the cache keys under the prefix and nothing else; how many went."""
        _, removed = self._attempt(self._unlink_all)
        return removed or 0

    def streams_under(self, prefixes: Iterable[str]) -> list[str]:
        """The stream keys under any of `prefixes`: a job queue shares this server."""
        def scan(client: redis.Redis) -> list[str]:
            return sorted({key.decode(errors="backslashreplace") for prefix in prefixes
                           for key in client.scan_iter(match=_glob_under(prefix),
                                                       count=SCAN_BATCH, _type="STREAM")})
        _, streams = self._attempt(scan)
        return streams or []

    def close(self) -> None:
        """Close the connection pool."""
        self._closed = True
        with contextlib.suppress(redis.RedisError):
            self._client.close()

    def _scan_all(self, client: redis.Redis) -> list[str]:
        found = client.scan_iter(match=_glob_under(namespace(self.prefix)), count=SCAN_BATCH,
                                 _type="STRING")
        return [raw.decode() for raw in found if self._owns(raw)]

    def _owns(self, raw_key: bytes) -> bool:
        # The glob also matches keys no cache wrote, and those of a longer
        # prefix such as "imgpipe:cache:x"; cache keys are ASCII.
        if not raw_key.isascii():
            return False
        try:
            return parse_key(raw_key.decode()).prefix == self.prefix
        except ValueError:
            return False

    def _sum_lengths(self, client: redis.Redis) -> int:
        keys = self._scan_all(client)
        total = 0
        for start in range(0, len(keys), SCAN_BATCH):
            pipe = client.pipeline(transaction=False)
            for key in keys[start:start + SCAN_BATCH]:
                pipe.strlen(key)
            total += sum(pipe.execute())
        return total

    def _unlink_all(self, client: redis.Redis) -> int:
        keys = self._scan_all(client)
        return sum(client.unlink(*keys[start:start + SCAN_BATCH])
                   for start in range(0, len(keys), SCAN_BATCH))

    def _attempt(self, operation: Callable[[redis.Redis], T]) -> tuple[bool, Optional[T]]:
        """Run one operation unless the server is down; (succeeded, result)."""
        if self._closed or not self._due():
            return False, None
        try:
            result = operation(self._client)
        except OUTAGE_ERRORS as exc:
            self._went_down(exc)
            return False, None
        except redis.RedisError as exc:
            self.stats.bump(errors=1)
            log.debug("Redis tier command failed: %s: %s", type(exc).__name__, exc)
            return False, None
        self._came_back()
        return True, result

    def _due(self) -> bool:
        """True when up, or when down and this caller may probe the server."""
        if not self._down:
            return True
        if time.monotonic() < self._next_probe:
            return False
        with self._lock:
            now = time.monotonic()
            if not self._down or now >= self._next_probe:
                # Claim the probe: other threads keep skipping while it runs.
                self._next_probe = now + self.retry_interval_s
                return True
            return False

    def _went_down(self, exc: BaseException) -> None:
        with self._lock:
            self.stats.bump(errors=1)
            self._next_probe = time.monotonic() + self.retry_interval_s
            if self._down:
                return
            self._down = True
            self.stats.available = False
        # redis-py's connection errors name host:port only, never the password.
        log.warning("Redis tier at %s unavailable (%s: %s); running without it, retrying "
                    "every %g s", self.location, type(exc).__name__, exc, self.retry_interval_s)

    def _came_back(self) -> None:
        if not self._down:
            return
        with self._lock:
            if not self._down:
                return
            self._down = False
            self.stats.available = True
        log.warning("Redis tier back at %s", self.location)


def _glob_under(prefix: str) -> str:
    """A SCAN pattern for the keys under `prefix:`, its glob characters escaped."""
    return re.sub(r"([*?\[\]\\])", r"\\\1", prefix) + ":*"

