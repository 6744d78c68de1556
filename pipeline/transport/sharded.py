"""One daemon serving several shards: their jobs merged into one engine, each
result written back to its own shard.

Every shard keeps its own StreamSource, ResultPublisher, InFlight and Outage:
entry ids of different streams can be equal, so nothing is keyed by entry id
across shards; in the engine a job's `ref` is "<shard>/<entry id>". Each shard
is read on a thread of its own and written on another, so a shard whose Redis
is down or stalled holds up only its own threads while the others are served.
Nothing grows without bound: a reader holds at most one chunk the engine has
not taken, a writer at most WRITE_QUEUE_BATCHES batches.
"""

from __future__ import annotations

import logging
import queue
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Optional, Protocol

from pipeline.errors import TransientError
from pipeline.items import Job, Record
from pipeline.transport.consumer import StreamSource
from pipeline.transport.publisher import InFlight, ResultPublisher

log = logging.getLogger("imgpipe.serve")

REF_SEPARATOR = "/"
# A reader's longest wait for new jobs in one read (the source's read_block_ms caps it).
READ_WAIT_S = 1.0
# Batches waiting for one shard's writer; more blocks the engine (the pipeline's
# window bounds what can be in flight for a shard anyway).
WRITE_QUEUE_BATCHES = 64
_END = None  # what tells a writer that no more batches come


class ShardSource(Protocol):
    """One shard's jobs (a StreamSource)."""

    def setup(self) -> None: ...

    def next_chunk(self, wait_s: float) -> Optional[list[Job]]: ...

    def stop(self) -> None: ...


@dataclass
class Lane:
    """One served shard: where its jobs come from and its results go."""

    index: int
    source: StreamSource
    publisher: ResultPublisher
    in_flight: InFlight


def shard_ref(index: int, entry_id: str) -> str:
    return f"{index}{REF_SEPARATOR}{entry_id}"


def split_ref(ref: str) -> tuple[int, str]:
    """(shard index, entry id) of a ref made by `shard_ref`."""
    index, _, entry_id = ref.partition(REF_SEPARATOR)
    return int(index), entry_id


class MergedSource:
    """The engine's ChunkSource over several shards, taking their chunks in turn."""

    def __init__(self, sources: Mapping[int, ShardSource]) -> None:
        self._lanes = list(sources.items())  # (shard index, its source)
        self._chunks: list[Optional[list[Job]]] = [None] * len(self._lanes)
        self._ended = [False] * len(self._lanes)
        self._error: Optional[BaseException] = None
        self._turn = 0  # the lane asked first next time: every shard gets its turn
        self._changed = threading.Condition()

    def start(self) -> None:
        """Start one reader per shard; each creates its group first, waiting for its
        Redis meanwhile without holding up the others."""
        for position, (index, source) in enumerate(self._lanes):
            threading.Thread(target=self._read, args=(position, index, source), daemon=True,
                             name=f"shard-{index}-reader").start()

    def stop(self) -> None:
        """Stop reading every shard; what was read still comes out, then None."""
        for _, source in self._lanes:
            source.stop()

    def ready(self) -> int:
        """Chunks read and not taken yet (one per shard at most)."""
        with self._changed:
            return sum(chunk is not None for chunk in self._chunks)

    def next_chunk(self, wait_s: float) -> Optional[list[Job]]:
        deadline = time.monotonic() + wait_s
        with self._changed:
            while True:
                chunk = self._take()
                if chunk is not None:
                    return chunk
                if self._error is not None:
                    raise self._error
                if all(self._ended):
                    return None
                remaining_s = deadline - time.monotonic()
                if remaining_s <= 0:
                    return []
                self._changed.wait(remaining_s)

    def _take(self) -> Optional[list[Job]]:
        for step in range(len(self._lanes)):
            position = (self._turn + step) % len(self._lanes)
            chunk = self._chunks[position]
            if chunk is not None:
                self._chunks[position] = None
                self._turn = (position + 1) % len(self._lanes)
                self._changed.notify_all()  # its reader may read the next one
                return chunk
        return None

    def _read(self, position: int, index: int, source: ShardSource) -> None:
        try:
            source.setup()
            while (chunk := source.next_chunk(READ_WAIT_S)) is not None:
                if chunk:
                    for job in chunk:
                        job.ref = shard_ref(index, job.ref or "")
                    self._hand_over(position, chunk)
        except TransientError:
            pass  # stopped while waiting for its Redis: nothing was read
        except BaseException as exc:  # raised to the engine by next_chunk
            with self._changed:
                self._error = exc
        finally:
            with self._changed:
                self._ended[position] = True
                self._changed.notify_all()

    def _hand_over(self, position: int, chunk: list[Job]) -> None:
        with self._changed:
            while self._chunks[position] is not None:
                self._changed.wait()
            self._chunks[position] = chunk
            self._changed.notify_all()


class ShardedPublisher:
    """The engine's sink over several shards: each record to its own shard's
    publisher, written on that shard's thread."""

    def __init__(self, lanes: Sequence[Lane]) -> None:
        self._lanes = {lane.index: lane for lane in lanes}
        self._queues: dict[int, queue.Queue[Optional[list[Record]]]] = {
            lane.index: queue.Queue(WRITE_QUEUE_BATCHES) for lane in lanes}
        self._threads: list[threading.Thread] = []
        self._error: Optional[BaseException] = None

    @property
    def published(self) -> int:
        return sum(lane.publisher.published for lane in self._lanes.values())

    def start(self) -> None:
        for lane in self._lanes.values():
            thread = threading.Thread(target=self._write, args=(lane,), daemon=True,
                                      name=f"shard-{lane.index}-writer")
            thread.start()
            self._threads.append(thread)

    def write(self, records: list[Record]) -> None:
        """Queue each shard's part of one batch for its writer."""
        if self._error is not None:
            raise self._error
        parts: dict[int, list[Record]] = {}
        for record in records:
            index, entry_id = split_ref(record["ref"])
            parts.setdefault(index, []).append({**record, "ref": entry_id})
        for index, part in parts.items():
            self._queues[index].put(part)

    def close(self) -> None:
        """Wait until every queued result is written (each writer retries while its
        Redis is down: the drain's grace period bounds this)."""
        for writes in self._queues.values():
            writes.put(_END)
        for thread in self._threads:
            thread.join()
        if self._error is not None:
            raise self._error

    def _write(self, lane: Lane) -> None:
        writes = self._queues[lane.index]
        while (part := writes.get()) is not _END:
            try:
                lane.publisher.write(part)
            except BaseException as exc:  # a denial: raised to the engine by write
                log.error("shard %d: results cannot be written: %s", lane.index, exc)
                self._error = exc
                return
