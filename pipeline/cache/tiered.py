"""Read-through over several tiers, write-behind through one bounded queue.

Reads ask each tier in order (fastest first) and promote a hit into the
tiers before it. Writes are queued and stored by one daemon thread; when the
queue is full the write is dropped and counted, because a cache write must
never make inference wait. A corrupt entry is deleted from the tier that
returned it, counted, and treated as a miss there (the next tier is asked).

With a `secret` every entry is signed on its way in and checked on its way
out (codec.sign_entry / open_entry): an unsigned or forged entry is corrupt.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Optional, TypeVar

import numpy as np

from pipeline.cache import LOGGER_NAME, CacheTier
from pipeline.cache.codec import (
    CorruptEntry,
    check_entry,
    decode_tensor,
    encode_tensor,
    open_entry,
    sign_entry,
)

log = logging.getLogger(LOGGER_NAME)

MISS = "miss"
T = TypeVar("T")
_Write = tuple[str, bytes, tuple[CacheTier, ...]]


@dataclass
class CacheStats:
    """What the tiered cache did, on top of each tier's own `TierStats`."""

    hits: dict[str, int] = field(default_factory=dict)  # decoded hits per tier name
    misses: int = 0
    corrupt: int = 0  # entries that failed validation and were deleted
    queued_writes: int = 0
    dropped_writes: int = 0  # the write queue was full (or the cache closed)
    write_errors: int = 0  # a tier raised despite its contract


@dataclass
class VerifyReport:
    """The outcome of `verify_tier`: entries checked, corrupt ones deleted."""

    checked: int = 0
    corrupt: int = 0
    vanished: int = 0  # listed, then evicted or expired before it could be read


class TieredCache:
    """Tiers in read order (e.g. [LocalTier, RedisTier]) behind one interface."""

    def __init__(self, tiers: Sequence[CacheTier], write_queue_items: int = 256,
                 secret: Optional[bytes] = None) -> None:
        if write_queue_items < 1:
            raise ValueError(f"write_queue_items must be positive, got {write_queue_items}")
        self.tiers = tuple(tiers)
        self.secret = secret
        self.stats = CacheStats()
        self._queue: queue.Queue[Optional[_Write]] = queue.Queue(write_queue_items)
        self._lock = threading.Lock()
        self._idle = threading.Condition(self._lock)
        self._pending = 0
        self._writer: Optional[threading.Thread] = None
        self._closed = False

    def setup(self) -> dict[str, bool]:
        """Open every tier now (reports outages at start); availability by name."""
        return {tier.name: tier.setup() for tier in self.tiers}

    def get(self, key: str) -> tuple[bytes | None, str]:
        """(raw bytes, tier name) of the first tier holding `key`, or (None, "miss")."""
        return self.get_decoded(key, lambda blob: blob)

    def get_tensor(self, key: str, spec_digest: str) -> tuple[np.ndarray | None, str]:
        """(array, tier name) or (None, "miss"); the array is a read-only view."""
        return self.get_decoded(key, lambda blob: decode_tensor(blob, spec_digest))

    def get_decoded(self, key: str, decode: Callable[[bytes], T]) -> tuple[T | None, str]:
        """Read through the tiers, decoding with `decode` (which raises CorruptEntry)."""
        for position, tier in enumerate(self.tiers):
            blob = tier.get(key)
            if blob is None:
                continue
            try:
                value = decode(open_entry(self.secret, key, blob))
            except CorruptEntry as exc:
                self._discard(tier, key, exc)
                continue
            self._count_hit(tier.name)
            if position:  # promoted as stored: a signed entry keeps its signature
                self._enqueue(key, blob, self.tiers[:position])
            return value, tier.name
        with self._lock:
            self.stats.misses += 1
        return None, MISS

    def get_local(self, key: str, decode: Callable[[bytes], T]) -> T | None:
        """Read the first tier only (host-specific entries); corrupt is a miss."""
        tier = self.tiers[0]
        blob = tier.get(key)
        if blob is None:
            return None
        try:
            return decode(open_entry(self.secret, key, blob))
        except CorruptEntry as exc:
            self._discard(tier, key, exc)
            return None

    def put_local(self, key: str, value: bytes) -> bool:
        """Queue a write to the first tier only (see `get_local`)."""
        return self._enqueue(key, self._sealed(key, value), self.tiers[:1])

    def put(self, key: str, value: bytes) -> bool:
        """Queue a write to every tier; False when it was dropped. Never blocks."""
        return self._enqueue(key, self._sealed(key, value), self.tiers)

    def put_tensor(self, key: str, array: np.ndarray, spec_digest: str) -> bool:
        """Encode and queue a tensor (see `put`)."""
        return self.put(key, encode_tensor(array, spec_digest))

    def flush(self, timeout_s: float = 5.0) -> bool:
        """Wait until every queued write is stored; False on timeout."""
        deadline = time.monotonic() + timeout_s
        with self._idle:
            while self._pending:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    return False
                self._idle.wait(remaining)
        return True

    def close(self, timeout_s: float = 5.0) -> None:
        """Store what is queued (within `timeout_s`), stop the writer, close the tiers."""
        if self._closed:
            return
        deadline = time.monotonic() + timeout_s
        self.flush(timeout_s)
        with self._lock:
            self._closed = True
            writer = self._writer
        if writer is not None:
            try:
                self._queue.put(None, timeout=max(deadline - time.monotonic(), 0.01))
                writer.join(max(deadline - time.monotonic(), 0.01))
            except queue.Full:
                log.warning("cache writer still busy after %g s; closing without it", timeout_s)
        for tier in self.tiers:
            tier.close()

    def _sealed(self, key: str, value: bytes) -> bytes:
        return value if self.secret is None else sign_entry(self.secret, key, value)

    def _enqueue(self, key: str, value: bytes, tiers: tuple[CacheTier, ...]) -> bool:
        with self._lock:
            if self._closed:
                self.stats.dropped_writes += 1
                return False
            self._start_writer()
            try:
                self._queue.put_nowait((key, value, tiers))
            except queue.Full:
                self.stats.dropped_writes += 1
                return False
            self._pending += 1
            self.stats.queued_writes += 1
        return True

    def _start_writer(self) -> None:
        # Started on first use, not in __init__: a cache that is only read
        # (e.g. by `cache verify`) never needs a thread.
        if self._writer is None:
            self._writer = threading.Thread(target=self._drain, name="imgpipe-cache-writer",
                                            daemon=True)
            self._writer.start()

    def _drain(self) -> None:
        while (item := self._queue.get()) is not None:
            key, value, tiers = item
            for tier in tiers:
                self._store(tier, key, value)
            with self._idle:
                self._pending -= 1
                if not self._pending:
                    self._idle.notify_all()

    def _store(self, tier: CacheTier, key: str, value: bytes) -> None:
        try:
            tier.set(key, value)
        except Exception:  # keep the writer alive whatever a tier does
            with self._lock:
                self.stats.write_errors += 1
            log.exception("cache tier %s raised on set", tier.name)

    def _discard(self, tier: CacheTier, key: str, exc: CorruptEntry) -> None:
        log.debug("corrupt entry %s in tier %s: %s", key, tier.name, exc)
        tier.delete(key)
        tier.stats.bump(errors=1)
        with self._lock:
            self.stats.corrupt += 1

    def _count_hit(self, tier_name: str) -> None:
        with self._lock:
            self.stats.hits[tier_name] = self.stats.hits.get(tier_name, 0) + 1


def verify_tier(tier: CacheTier, secret: Optional[bytes] = None) -> VerifyReport:
    """Decode every entry of `tier` and delete the corrupt ones (`cache verify`);
    with a `secret`, unsigned and forged entries are corrupt too."""
    report = VerifyReport()
    for key in tier.iter_keys():
        blob = tier.get(key)
        if blob is None:
            report.vanished += 1
            continue
        report.checked += 1
        try:
            check_entry(key, open_entry(secret, key, blob))
        except CorruptEntry:
            tier.delete(key)
            report.corrupt += 1
    return report
