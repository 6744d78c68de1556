"""A content-addressed cache of preprocessed tensors and predictions.

    TieredCache ──► LocalTier (diskcache: SQLite + files, one host, many processes)
                └─► RedisTier (shared by hosts, TTL)

Reads go through the tiers in order and promote a hit into the faster tiers;
writes go through a bounded queue drained by one background thread, so a slow
or dead tier never blocks inference. A tier never raises into its caller: it
counts the error, reports a miss and, when its backend is gone, switches
itself off with one warning on the "imgpipe.cache" logger.

Only `redis_tier` imports redis and only `local` imports diskcache.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Protocol

LOGGER_NAME = "imgpipe.cache"
COUNTERS = ("hits", "misses", "errors", "skipped", "bytes_read", "bytes_written")


@dataclass
class TierStats:
    """Counters of one tier since it was created (safe to bump from any thread)."""

    hits: int = 0
    misses: int = 0
    errors: int = 0
    skipped: int = 0  # writes refused on purpose (entry too large, tier down)
    bytes_read: int = 0
    bytes_written: int = 0
    available: bool = True
    _lock: threading.Lock = field(default_factory=threading.Lock, repr=False, compare=False)

    def bump(self, **deltas: int) -> None:
        """Add each delta to its counter atomically: `stats.bump(hits=1)`."""
        with self._lock:
            for name, delta in deltas.items():
                setattr(self, name, getattr(self, name) + delta)

    def snapshot(self) -> dict[str, int | bool]:
        """The counters as a plain dict (for `cache stats` and logs)."""
        with self._lock:
            return {name: getattr(self, name) for name in (*COUNTERS, "available")}


class CacheTier(Protocol):
    """One storage tier. Implementations never raise on get/set/delete."""

    name: str
    stats: TierStats

    def setup(self) -> bool:
        """Open the backend now (instead of on first use); True when usable."""
        ...

    def get(self, key: str) -> bytes | None:
        """The stored bytes, or None on a miss or when the tier is unavailable."""
        ...

    def set(self, key: str, value: bytes) -> None:
        """Store `value`; silently skipped when the tier is unavailable."""
        ...

    def delete(self, key: str) -> None:
        """Remove `key` if present."""
        ...

    def iter_keys(self) -> Iterator[str]:
        """Every key this tier holds under its namespace (for maintenance)."""
        ...

    def entry_count(self) -> int:
        """How many entries the tier holds (0 when unavailable)."""
        ...

    def volume_bytes(self) -> int:
        """Approximate bytes used by the entries (0 when unavailable)."""
        ...

    def clear(self) -> int:
        """Remove every entry in this tier's namespace; how many were removed."""
        ...

    def close(self) -> None:
        """Release connections and handles; the tier may not be used afterwards."""
        ...
