"""Jobs from `<prefix>:jobs`, read through one consumer group.

Only as much is read as the pipeline asks for (a chunk at a time, while its
window has room), so a backlog of any size stays in Redis. Before reading new
entries a consumer takes back its own pending ones (a restart under the same
name), and after an outage those that a read whose reply was lost delivered to
it; every `reclaim_interval_s` it takes over entries that another consumer
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

from pipeline.config import ServeSettings
from pipeline.items import Job
from pipeline.transport import contract
from pipeline.transport.connection import OUTAGE_ERRORS, Outage, passing
from pipeline.transport.contract import JobRules, reply_text
from pipeline.transport.publisher import (
    Delivery,
    InFlight,
    ResultPublisher,
    Streams,
    queue_wait_ms,
)

log = logging.getLogger("imgpipe.serve")

Entry = tuple[str, Mapping[bytes, bytes]]
Read = tuple[str, Mapping[bytes, bytes], Optional[int]]  # with its delivery count, if known
STALE_CONSUMER_FACTOR = 10  # a consumer idle this many claim timeouts, with nothing pending
FORGET_STALE_CONSUMERS = """
for _, row in ipairs(redis.call('XINFO', 'CONSUMERS', KEYS[1], ARGV[1])) do
    local consumer = {}
    for i = 1, #row, 2 do consumer[row[i]] = row[i + 1] end
    if consumer.name ~= ARGV[3] and consumer.pending == 0
            and consumer.idle > tonumber(ARGV[2]) then
        redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], consumer.name)
    end
end
"""


LEAVE_GROUP = """
if #redis.call('XPENDING', KEYS[1], ARGV[1], '-', '+', 1, ARGV[2]) == 0 then
    return redis.call('XGROUP', 'DELCONSUMER', KEYS[1], ARGV[1], ARGV[2])
end
return -1
"""
# Errors of a read whose stream or group was deleted under it; "no such key" is
# XINFO's (in FORGET_STALE_CONSUMERS, run at the end of a reclaim pass).
GROUP_GONE = ("NOGROUP", "UNBLOCKED", "no such key")


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
        self.group_missing = False
        self.own_pending_cursor: Optional[str] = "0-0"  # None once our PEL is re-read
        self.lost_cursor: Optional[str] = None  # set by an outage: look for lost replies
        self.reclaim_cursor = "0-0"
        self.next_reclaim = 0.0  # monotonic
        # Logged once per pass, not per page: repeated warnings are folded, so a
        # per-page line would understate how many jobs moved.
        self.own_pending_read = 0
        self.lost_found = 0
        self.taken_over = 0

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
        except (*OUTAGE_ERRORS, redis.ResponseError) as exc:
            if str(exc).startswith(GROUP_GONE):
                log.warning("consumer group %s or stream %s is gone (deleted, or lost with a Redis "
                            "restart or failover); creating it again",
                            self.streams.group, self.streams.keys.jobs)
                self.group_missing = True
                return []
            self.outage.raise_unless_passing(exc)
            # A read may have delivered entries to us although its reply was lost.
            self.lost_cursor = "-"
            self.stopping.wait(min(self.outage.failed(exc), wait_s))
            return []
        self.outage.recovered()
        return [job for job in map(self._admit, entries) if job is not None]

    def _read(self, wait_s: float) -> list[Read]:
        """Entries with their delivery counts (None for a first delivery)."""
        if self.group_missing:
            self._create_group()
            self.group_missing = False
            return []
        if self.own_pending_cursor is not None:
            return self._own_pending()
        if self.lost_cursor is not None:
            return self._lost_deliveries()
        if time.monotonic() >= self.next_reclaim:
            return self._reclaim()
        # Without BLOCK when asked not to wait: Redis ends a blocked read only on
        # its timer tick (100 ms at the default hz), not after BLOCK's milliseconds.
        block_ms = max(1, min(int(wait_s * 1000), self.cfg.read_block_ms)) if wait_s else None
        reply = self.client.xreadgroup(self.streams.group, self.consumer,
                                       {self.streams.keys.jobs: ">"},
                                       count=self.chunk_size, block=block_ms)
        return [(reply_text(entry_id), fields, None) for entry_id, fields in _entries(reply)]

    def _own_pending(self) -> list[Read]:
        """Our own unacknowledged entries, from before a restart, one page per call."""
        assert self.own_pending_cursor is not None
        reply = self.client.xreadgroup(self.streams.group, self.consumer,
                                       {self.streams.keys.jobs: self.own_pending_cursor},
                                       count=self.chunk_size)
        entries = [(reply_text(entry_id), fields) for entry_id, fields in _entries(reply)]
        if not entries:
            self.own_pending_cursor = None
            if self.own_pending_read:
                log.info("re-read %d of this consumer's pending jobs", self.own_pending_read)
            return []
        self.own_pending_cursor = entries[-1][0]
        self.own_pending_read += len(entries)
        return self._with_deliveries(entries)

    def _lost_deliveries(self) -> list[Read]:
        """Entries pending with us but not in the pipeline: a read whose reply an outage
        swallowed delivered them. Without this they would wait for the claim timeout.

        One page of our PEL per call; XPENDING then XCLAIM rather than a re-read,
        so the jobs in flight keep their delivery counts.
        """
        assert self.lost_cursor is not None
        jobs, group = self.streams.keys.jobs, self.streams.group
        rows = self.client.xpending_range(jobs, group, self.lost_cursor, "+", self.chunk_size,
                                          self.consumer)
        if not rows:
            self.lost_cursor = None
            if self.lost_found:
                log.warning("found %d jobs delivered to this consumer in a reply lost to "
                            "the outage; running them", self.lost_found)
                self.lost_found = 0
            return []
        ids = [reply_text(row["message_id"]) for row in rows]
        self.lost_cursor = "(" + ids[-1]
        lost = [entry_id for entry_id in ids if entry_id not in self.in_flight]
        if not lost:
            return []
        # Entries deleted meanwhile are dropped from the PEL by XCLAIM (Redis 7).
        claimed: Any = self.client.xclaim(jobs, group, self.consumer, 0,
                                          lost)  # type: ignore[arg-type]
        entries = [(reply_text(entry_id), fields) for entry_id, fields in claimed if entry_id]
        self.lost_found += len(entries)
        return self._with_deliveries(entries)

    def _reclaim(self) -> list[Read]:
        """Take over entries idle too long with other (probably dead) consumers."""
        cursor, claimed, *_ = self.client.xautoclaim(
            self.streams.keys.jobs, self.streams.group, self.consumer,
            self.cfg.claim_idle_ms, self.reclaim_cursor, count=self.chunk_size)
        entries = [(reply_text(entry_id), fields) for entry_id, fields in claimed]
        entries = [(entry_id, fields) for entry_id, fields in entries
                   if entry_id not in self.in_flight]  # our own, still being worked on
        self.taken_over += len(entries)
        self.reclaim_cursor = reply_text(cursor)
        if self.reclaim_cursor == "0-0":  # one pass over the PEL done
            self._end_reclaim_pass()
        return self._with_deliveries(entries)

    def _end_reclaim_pass(self) -> None:
        self.next_reclaim = time.monotonic() + self.cfg.reclaim_interval_s
        if self.taken_over:
            log.warning("took over %d jobs pending longer than %d ms", self.taken_over,
                        self.cfg.claim_idle_ms)
            self.taken_over = 0
        self._forget_stale_consumers()

    def _with_deliveries(self, entries: list[Entry]) -> list[Read]:
        if not entries:
            return []
        pending = self.client.xpending_range(
            self.streams.keys.jobs, self.streams.group, entries[0][0], entries[-1][0],
            len(entries) + len(self.in_flight), self.consumer)
        counts = {reply_text(row["message_id"]): int(row["times_delivered"]) for row in pending}
        return [(entry_id, fields, counts.get(entry_id, 1)) for entry_id, fields in entries]

    def _admit(self, entry: Read) -> Optional[Job]:
        """The entry as a Job for the pipeline, or None when it was dealt with here."""
        entry_id, fields, deliveries = entry
        if entry_id in self.in_flight:  # delivered again while ours (the group was reset)
            return None
        if not fields:  # deleted while pending: answered by someone already
            self.publisher.acknowledge([entry_id])
            return None
        if deliveries is not None and deliveries > self.cfg.max_deliveries:
            # Before parsing: whatever in the job kills whoever takes it, it runs no more.
            self.publisher.dead_letter(contract.parse_address(entry_id, fields, self.rules),
                                       fields, deliveries - 1)
            return None
        request = contract.parse_job(entry_id, fields, self.rules, int(time.time() * 1000))
        self.in_flight.add(Delivery(request, queue_wait_ms(entry_id)))
        path = request.image or f"{self.streams.keys.jobs}/{entry_id}"
        return Job(path, error=request.error, data=request.data, topk=request.topk,
                   ref=entry_id, url=request.url, tta=request.tta,
                   output=request.output)

    def leave(self) -> None:
        """Remove this consumer from the group if it holds nothing, after a clean stop,
        so that `status` does not list it; one try, Redis may be gone."""
        try:
            self.client.eval(LEAVE_GROUP, 1, self.streams.keys.jobs, self.streams.group,
                             self.consumer)
        except (*OUTAGE_ERRORS, redis.ResponseError) as exc:
            log.info("could not remove consumer %s from the group: %s", self.consumer, exc)

    def _create_group(self) -> None:
        # Asked first: a server out of memory refuses XGROUP CREATE even for a group
        # that exists.
        if self._group_exists():
            return
        try:
            # From the start: entries still in the stream are exactly the unfinished ones.
            self.client.xgroup_create(self.streams.keys.jobs, self.streams.group, id="0",
                                      mkstream=True)
        except redis.ResponseError as exc:
            if "BUSYGROUP" not in str(exc):
                raise

    def _group_exists(self) -> bool:
        try:
            groups = self.client.xinfo_groups(self.streams.keys.jobs)
        except redis.ResponseError as exc:
            if passing(exc):
                raise
            return False  # no such stream yet
        return any(reply_text(group["name"]) == self.streams.group for group in groups)

    def _forget_stale_consumers(self) -> None:
        """Remove consumers long gone with nothing pending, so `status` stays readable.

        In one script: a consumer that read between a check and its removal
        would lose its pending entries with it.
        """
        self.client.eval(FORGET_STALE_CONSUMERS, 1, self.streams.keys.jobs, self.streams.group,
                         self.cfg.claim_idle_ms * STALE_CONSUMER_FACTOR, self.consumer)


def _entries(reply: Any) -> list[tuple[Any, Mapping[bytes, bytes]]]:
    """The entries of an XREADGROUP reply on one stream; a deleted one has no fields."""
    return [(entry_id, fields or {}) for _, entries in reply or [] for entry_id, fields in entries]

