"""Jobs from `<prefix>:jobs`, read through one consumer group.

Only as much is read as the pipeline asks for (a chunk at a time, while its
window has room), so a backlog of any size stays in Redis. Before reading new
entries a consumer takes back its own pending ones (a restart under the same
name); every `reclaim_interval_s` it takes over entries that another consumer
has held longer than `claim_idle_ms` (XAUTOCLAIM), since that consumer has
probably died. An entry delivered more than `max_deliveries` times is not run
again: it goes to the dead-letter stream with an error result.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Mapping
from typing import Any, Optional

import redis

from pipeline import wire
from pipeline.broker import OUTAGE_ERRORS, Outage
from pipeline.config import ServeSettings
from pipeline.items import Job
from pipeline.sinks.redis_results import (
    Delivery,
    InFlight,
    ResultPublisher,
    Streams,
    queue_wait_ms,
)
from pipeline.wire import JobRules

log = logging.getLogger("imgpipe.serve")

Entry = tuple[str, Mapping[bytes, bytes]]
STALE_CONSUMER_FACTOR = 10  # a consumer idle this many claim timeouts, with nothing pending


class StreamSource:
    """The engine's ChunkSource for a daemon; stop() ends it after the current read."""

    def __init__(self, client: redis.Redis, streams: Streams, consumer: str,
                 cfg: ServeSettings, rules: JobRules, chunk_size: int,
                 in_flight: InFlight, publisher: ResultPublisher, outage: Outage) -> None:
        self.client = client
        self.streams = streams
        self.consumer = consumer
        self.cfg = cfg
        self.rules = rules
        self.chunk_size = chunk_size
        self.in_flight = in_flight
        self.publisher = publisher
        self.outage = outage
        self.stopping = threading.Event()
        self.own_pending_cursor: Optional[str] = "0-0"  # None once our PEL is re-read
        self.reclaim_cursor = "0-0"
        self.next_reclaim = 0.0  # monotonic

    def setup(self) -> None:
        """Create the group (and stream) if missing; waits for Redis, gives up on stop()."""
        self.outage.retry(self._create_group, self.stopping)

    def stop(self) -> None:
        self.stopping.set()

    def next_chunk(self, wait_s: float) -> Optional[list[Job]]:
        if self.stopping.is_set():
            return None
        try:
            entries = self._read(wait_s)
        except OUTAGE_ERRORS as exc:
            self.stopping.wait(min(self.outage.failed(exc), wait_s))
            return []
        except redis.ResponseError as exc:
            if "NOGROUP" not in str(exc):
                raise
            log.warning("consumer group %s is gone (Redis restarted without its data?); "
                        "creating it again", self.streams.group)
            self._create_group()
            return []
        self.outage.recovered()
        return [job for job in map(self._admit, entries) if job is not None]

    def _read(self, wait_s: float) -> list[tuple[str, Mapping[bytes, bytes], Optional[int]]]:
        """Entries with their delivery counts (None for a first delivery)."""
        if self.own_pending_cursor is not None:
            return self._own_pending()
        if time.monotonic() >= self.next_reclaim:
            return self._reclaim()
        block_ms = max(1, min(int(wait_s * 1000), self.cfg.read_block_ms))
        reply = self.client.xreadgroup(self.streams.group, self.consumer,
                                       {self.streams.keys.jobs: ">"},
                                       count=self.chunk_size, block=block_ms)
        return [(_text(entry_id), fields, None) for entry_id, fields in _entries(reply)]

    def _own_pending(self) -> list[tuple[str, Mapping[bytes, bytes], Optional[int]]]:
        """Our own unacknowledged entries, from before a restart, one page per call."""
        assert self.own_pending_cursor is not None
        reply = self.client.xreadgroup(self.streams.group, self.consumer,
                                       {self.streams.keys.jobs: self.own_pending_cursor},
                                       count=self.chunk_size)
        entries = [(_text(entry_id), fields) for entry_id, fields in _entries(reply)]
        if not entries:
            self.own_pending_cursor = None
            return []
        self.own_pending_cursor = entries[-1][0]
        log.info("re-reading %d of this consumer's pending jobs", len(entries))
        return self._with_deliveries(entries)

    def _reclaim(self) -> list[tuple[str, Mapping[bytes, bytes], Optional[int]]]:
        """Take over entries idle too long with other (probably dead) consumers."""
        cursor, claimed, *_ = self.client.xautoclaim(
            self.streams.keys.jobs, self.streams.group, self.consumer,
            self.cfg.claim_idle_ms, self.reclaim_cursor, count=self.chunk_size)
        self.reclaim_cursor = _text(cursor)
        if self.reclaim_cursor == "0-0":  # one pass over the PEL done
            self.next_reclaim = time.monotonic() + self.cfg.reclaim_interval_s
            self._forget_stale_consumers()
        entries = [(_text(entry_id), fields) for entry_id, fields in claimed]
        entries = [(entry_id, fields) for entry_id, fields in entries
                   if entry_id not in self.in_flight]  # our own, still being worked on
        if entries:
            log.warning("took over %d jobs pending longer than %d ms", len(entries),
                        self.cfg.claim_idle_ms)
        return self._with_deliveries(entries)

    def _with_deliveries(self, entries: list[Entry]
                         ) -> list[tuple[str, Mapping[bytes, bytes], Optional[int]]]:
        if not entries:
            return []
        pending = self.client.xpending_range(
            self.streams.keys.jobs, self.streams.group, entries[0][0], entries[-1][0],
            len(entries) + len(self.in_flight), self.consumer)
        counts = {_text(row["message_id"]): int(row["times_delivered"]) for row in pending}
        return [(entry_id, fields, counts.get(entry_id, 1)) for entry_id, fields in entries]

    def _admit(self, entry: tuple[str, Mapping[bytes, bytes], Optional[int]]) -> Optional[Job]:
        """The entry as a Job for the pipeline, or None when it was dealt with here."""
        entry_id, fields, deliveries = entry
        if not fields:  # deleted while pending: answered by someone already
            self.publisher.acknowledge([entry_id])
            return None
        request = wire.parse_job(entry_id, fields, self.rules, int(time.time() * 1000))
        if deliveries is not None and deliveries > self.cfg.max_deliveries:
            self.publisher.dead_letter(request, fields, deliveries - 1)
            return None
        self.in_flight.add(Delivery(request, queue_wait_ms(entry_id)))
        path = request.image or f"{self.streams.keys.jobs}/{entry_id}"
        return Job(path, error=request.error, data=request.data, topk=request.topk,
                   ref=entry_id)

    def _create_group(self) -> None:
        try:
            # From the start: entries still in the stream are exactly the unfinished ones.
            self.client.xgroup_create(self.streams.keys.jobs, self.streams.group, id="0",
                                      mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _forget_stale_consumers(self) -> None:
        """Remove consumers long gone with nothing pending, so `status` stays readable."""
        limit_ms = self.cfg.claim_idle_ms * STALE_CONSUMER_FACTOR
        for consumer in self.client.xinfo_consumers(self.streams.keys.jobs, self.streams.group):
            name = _text(consumer["name"])
            if name != self.consumer and consumer["pending"] == 0 and consumer["idle"] > limit_ms:
                self.client.xgroup_delconsumer(self.streams.keys.jobs, self.streams.group, name)


def _entries(reply: Any) -> list[tuple[Any, Mapping[bytes, bytes]]]:
    """The entries of an XREADGROUP reply on one stream; a deleted one has no fields."""
    return [(entry_id, fields or {}) for _, entries in reply or [] for entry_id, fields in entries]


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)
