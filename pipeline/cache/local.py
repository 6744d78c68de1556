"""The on-host tiers: `LocalTier` on disk (diskcache) and `MemoryTier` in memory.

`LocalTier` stores entries with diskcache: an SQLite index (WAL mode) plus one
file per value of 32 KiB or more, which is every tensor. SQLite's locking makes
it safe for many processes on one host to read and write the same directory
at once; each process opens its own connection (a `LocalTier` that crosses a
fork reopens itself in the child rather than share the parent's connection).

Eviction: the cache is capped at `max_bytes` with the "least-recently-used"
policy, so every read also records its access time (a small write). diskcache
culls on write: once the volume reaches the limit, each write evicts at most
`cull_limit` (10) least-recently-used entries, so the limit is soft and is
exceeded by at most a few entries.

If the directory cannot be created or written, or the disk fills up, the tier
switches itself off with one warning and every later call is a cheap no-op:
a cache must never stop a run.
"""

from __future__ import annotations

import logging
import os
import sqlite3
import threading
from collections import OrderedDict
from collections.abc import Iterator
from pathlib import Path
from typing import Any, Optional

import diskcache

from pipeline.cache import LOGGER_NAME, TierStats

log = logging.getLogger(LOGGER_NAME)

EVICTION_POLICY = "least-recently-used"
CULL_LIMIT = 10
# SQLite's busy timeout: a read or write waits this long for another
# process's lock, then counts as a miss instead of stalling the hot path.
DEFAULT_LOCK_TIMEOUT_S = 2.0
# diskcache raises Timeout for a lock it could not get in time (and SQLite may
# say "database is locked"): a miss, not a fault. Anything else from SQLite or
# the file system (no such directory, disk full, I/O error) means the
# directory is unusable.
_BUSY = (diskcache.Timeout,)
_BROKEN = (OSError, sqlite3.Error)


class LocalTier:
    """A size-capped LRU cache in `directory`, shared by the processes of one host."""

    name = "local"

    def __init__(self, directory: Path, max_bytes: int,
                 lock_timeout_s: float = DEFAULT_LOCK_TIMEOUT_S) -> None:
        if max_bytes < 1:
            raise ValueError(f"max_bytes must be positive, got {max_bytes}")
        self.directory = Path(directory)
        self.max_bytes = max_bytes
        self.lock_timeout_s = lock_timeout_s
        self.stats = TierStats()
        self._cache: Optional[diskcache.Cache] = None
        self._pid = 0
        self._disabled = False
        self._lock = threading.Lock()

    def setup(self) -> bool:
        """Open (and create) the cache directory now; False if it is unusable."""
        return self._open() is not None

    def get(self, key: str) -> bytes | None:
        """The stored bytes, or None on a miss, a busy lock or a disabled tier."""
        value = self._run(lambda cache: cache.get(key))
        if isinstance(value, bytes):
            self.stats.bump(hits=1, bytes_read=len(value))
            return value
        self.stats.bump(misses=1)
        return None

    def set(self, key: str, value: bytes) -> None:
        """Store `value`, evicting least-recently-used entries beyond `max_bytes`."""
        if self._run(lambda cache: cache.set(key, value)):
            self.stats.bump(bytes_written=len(value))

    def delete(self, key: str) -> None:
        """Remove `key` if present."""
        self._run(lambda cache: cache.delete(key))

    def iter_keys(self) -> Iterator[str]:
        """Every key in the cache (a snapshot; entries may vanish meanwhile)."""
        keys = self._run(lambda cache: list(cache.iterkeys()))
        return iter(keys or [])

    def entry_count(self) -> int:
        """How many entries the cache holds."""
        return int(self._run(len) or 0)

    def volume_bytes(self) -> int:
        """The cache's size on disk: the SQLite pages plus the value files."""
        return int(self._run(lambda cache: cache.volume()) or 0)

    def clear(self) -> int:
        """Remove every entry; how many were removed."""
        return int(self._run(lambda cache: cache.clear()) or 0)

    def close(self) -> None:
        """Close this process's connection (safe to call twice)."""
        with self._lock:
            cache, self._cache = self._cache, None
        if cache is not None and self._pid == os.getpid():
            cache.close()

    def _run(self, operation: Any) -> Any:
        cache = self._open()
        if cache is None:
            return None
        try:
            return operation(cache)
        except _BUSY:
            self.stats.bump(errors=1)
        except _BROKEN as exc:
            if _is_lock_contention(exc):
                self.stats.bump(errors=1)
            else:
                self._disable(exc)
        return None

    def _open(self) -> Optional[diskcache.Cache]:
        if self._disabled:
            return None
        if self._cache is not None and self._pid == os.getpid():
            return self._cache
        with self._lock:
            if self._cache is None or self._pid != os.getpid():
                # After a fork the parent's SQLite connection must not be reused.
                self._cache = self._connect()
                self._pid = os.getpid()
            return self._cache

    def _connect(self) -> Optional[diskcache.Cache]:
        try:
            return diskcache.Cache(
                str(self.directory), timeout=self.lock_timeout_s, size_limit=self.max_bytes,
                eviction_policy=EVICTION_POLICY, cull_limit=CULL_LIMIT)
        except (*_BROKEN, *_BUSY) as exc:
            self._disable(exc, locked=True)
            return None

    def _disable(self, exc: BaseException, locked: bool = False) -> None:
        if locked:
            self._disable_locked(exc)
        else:
            with self._lock:
                self._disable_locked(exc)

    def _disable_locked(self, exc: BaseException) -> None:
        self.stats.bump(errors=1)
        if self._disabled:
            return
        self._disabled = True
        self.stats.available = False
        self._cache = None
        log.warning("local cache disabled, running without it: %s is unusable (%s: %s)",
                    self.directory, type(exc).__name__, exc)


def _is_lock_contention(exc: BaseException) -> bool:
    return isinstance(exc, sqlite3.OperationalError) and (
        "locked" in str(exc) or "busy" in str(exc))


class MemoryTier:
    """An in-process LRU tier holding at most `max_bytes` of values.

    The in-memory implementation of the tier protocol: for tests, and as a
    small first tier in front of the disk when images repeat within a run.
    """

    name = "memory"

    def __init__(self, max_bytes: int, name: str = "memory") -> None:
        self.name = name
        self.max_bytes = max_bytes
        self.stats = TierStats()
        self._entries: OrderedDict[str, bytes] = OrderedDict()
        self._volume = 0
        self._lock = threading.Lock()

    def setup(self) -> bool:
        """Nothing to open."""
        return True

    def get(self, key: str) -> bytes | None:
        """The stored bytes (now most recently used), or None."""
        with self._lock:
            value = self._entries.get(key)
            if value is not None:
                self._entries.move_to_end(key)
        if value is None:
            self.stats.bump(misses=1)
        else:
            self.stats.bump(hits=1, bytes_read=len(value))
        return value

    def set(self, key: str, value: bytes) -> None:
        """Store `value`, evicting least-recently-used entries beyond `max_bytes`."""
        if len(value) > self.max_bytes:
            self.stats.bump(skipped=1)
            return
        with self._lock:
            self._pop(key)
            self._entries[key] = value
            self._volume += len(value)
            while self._volume > self.max_bytes:
                self._pop(next(iter(self._entries)))
        self.stats.bump(bytes_written=len(value))

    def delete(self, key: str) -> None:
        """Remove `key` if present."""
        with self._lock:
            self._pop(key)

    def iter_keys(self) -> Iterator[str]:
        """A snapshot of the keys, least recently used first."""
        with self._lock:
            return iter(list(self._entries))

    def entry_count(self) -> int:
        """How many entries are held."""
        return len(self._entries)

    def volume_bytes(self) -> int:
        """The total size of the values held."""
        return self._volume

    def clear(self) -> int:
        """Remove everything; how many entries were removed."""
        with self._lock:
            removed = len(self._entries)
            self._entries.clear()
            self._volume = 0
        return removed

    def close(self) -> None:
        """Drop the entries."""
        self.clear()

    def _pop(self, key: str) -> None:
        value = self._entries.pop(key, None)
        if value is not None:
            self._volume -= len(value)
