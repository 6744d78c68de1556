"""Results back into Redis: each result and its job's XACK in one MULTI.

A job is acknowledged (and deleted from the jobs stream, which so holds only
unfinished work) in the same transaction that writes its result, so a crash
at any point leaves either both or neither: at least once, never lost. While
Redis is unreachable the writes wait and retry; the bounded pipeline behind
them stops reading meanwhile.
"""

from __future__ import annotations

import json
import logging
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional

import redis

from pipeline.items import ErrorInfo, Record
from pipeline.logs import UNFOLDED
from pipeline.transport import contract
from pipeline.transport.connection import Outage
from pipeline.transport.contract import JobRequest, Keys

if TYPE_CHECKING:
    from pipeline.metrics import Metrics

log = logging.getLogger("imgpipe.serve")


@dataclass
class Delivery:
    """A job read from the stream and not yet answered."""

    request: JobRequest
    queue_wait_ms: float


class InFlight:
    """Jobs between the stream and their results, by entry id (thread-safe)."""

    def __init__(self) -> None:
        self._deliveries: dict[str, Delivery] = {}
        self._lock = threading.Lock()

    def add(self, delivery: Delivery) -> None:
        with self._lock:
            self._deliveries[delivery.request.entry_id] = delivery

    def get(self, entry_id: str) -> Delivery:
        with self._lock:
            return self._deliveries[entry_id]

    def remove(self, entry_ids: list[str]) -> None:
        with self._lock:
            for entry_id in entry_ids:
                self._deliveries.pop(entry_id, None)

    def __contains__(self, entry_id: object) -> bool:
        with self._lock:
            return entry_id in self._deliveries

    def __len__(self) -> int:
        with self._lock:
            return len(self._deliveries)


@dataclass(frozen=True)
class Streams:
    """Where a daemon reads and writes, and how long result streams may grow."""

    keys: Keys
    group: str
    results_maxlen: int
    dead_maxlen: int
    reply_ttl_s: int = 86_400

    def private(self, stream: str) -> bool:
        """A caller's own reply stream (Client.reply_stream): `<prefix>:results:<id>`."""
        return stream.startswith(self.keys.results + ":")


class ResultPublisher:
    """Writes results, acknowledges jobs, and files dead letters."""

    def __init__(self, client: redis.Redis, streams: Streams, model: str,
                 in_flight: InFlight, outage: Outage, metrics: Optional[Metrics] = None,
                 in_flight_total: Optional[Callable[[], int]] = None) -> None:
        self.client = client
        self.streams = streams
        self.model = model
        self.in_flight = in_flight
        self.outage = outage
        self.metrics = metrics
        # The daemon's jobs in flight, for the metric: with shards, every shard's.
        self.in_flight_total = in_flight_total or in_flight.__len__
        self.published = 0

    def write(self, records: list[Record]) -> None:
        """Publish one batch's records (the engine's sink); retries until Redis takes them."""
        deliveries = [self.in_flight.get(record["ref"]) for record in records]
        results = [contract.result_fields(record, d.request, self.model, d.queue_wait_ms)
                   for record, d in zip(records, deliveries, strict=True)]
        requests = [d.request for d in deliveries]
        started = time.perf_counter()
        replies = self.outage.retry(lambda: self._answer(requests, results))
        self._rescue_failed(requests, results, replies)
        self.in_flight.remove([request.entry_id for request in requests])
        self.published += len(records)
        if self.metrics is not None:
            share = (time.perf_counter() - started) / len(records)  # each job's, as for inference
            for _ in records:
                self.metrics.observe_stage("publish", share)
            self.metrics.set_in_flight(self.in_flight_total())

    def dead_letter(self, request: JobRequest, fields: Mapping[bytes, bytes],
                    deliveries: int) -> None:
        """File a job delivered too often under <prefix>:dead, with an error result."""
        error = ErrorInfo(code="too_many_deliveries",
                          message=f"delivered {deliveries} times without a result (it may "
                                  f"crash or stall the daemon); moved to "
                                  f"{self.streams.keys.dead}")
        dead: dict[Any, Any] = dict(fields)  # the original fields, then ours
        dead.update({b"error": json.dumps(error), b"deliveries": str(deliveries),
                     b"entry_id": request.entry_id})
        result = contract.result_fields(
            Record(path=request.job_id, status="error", error=error), request, self.model,
            0.0)

        def send() -> list[object]:
            pipe = self.client.pipeline(transaction=True)
            pipe.xadd(self.streams.keys.dead, dead,
                      maxlen=self.streams.dead_maxlen, approximate=True)
            self._queue_answer(pipe, request, result)
            self._queue_expiry(pipe, [request])
            return list(pipe.execute(raise_on_error=False))

        replies = self.outage.retry(send)
        self._rescue_failed([request], [result], replies[1:])
        if self.metrics is not None:
            self.metrics.dead_lettered()
        log.warning("job %s (entry %s) dead-lettered after %d deliveries",
                    request.job_id, request.entry_id, deliveries,
                    extra={**UNFOLDED, "job_id": request.job_id})

    def acknowledge(self, entry_ids: list[str]) -> None:
        """Drop entries that need no answer (deleted from the stream while pending)."""
        if entry_ids:
            self.outage.retry(lambda: self._ack(entry_ids))

    def _answer(self, requests: list[JobRequest], results: list[dict[str, str]]) -> list[object]:
        # Rebuilt on every try: redis-py empties a pipeline whose execute failed.
        pipe = self.client.pipeline(transaction=True)
        for request, result in zip(requests, results, strict=True):
            self._queue_answer(pipe, request, result)
        self._queue_expiry(pipe, requests)
        return list(pipe.execute(raise_on_error=False))

    def _queue_answer(self, pipe: redis.client.Pipeline, request: JobRequest,
                      result: dict[str, str]) -> None:
        jobs = self.streams.keys.jobs
        # Only the default stream is ours to trim: a client's own stream keeps
        # whatever else it holds.
        maxlen = self.streams.results_maxlen if request.reply_to == self.streams.keys.results \
            else None
        pipe.xadd(request.reply_to, result,  # type: ignore[arg-type]
                  maxlen=maxlen, approximate=True)
        pipe.xack(jobs, self.streams.group, request.entry_id)
        pipe.xdel(jobs, request.entry_id)

    def _queue_expiry(self, pipe: redis.client.Pipeline, requests: list[JobRequest]) -> None:
        """Private reply streams expire `reply_ttl_s` after their last result: one
        written after its caller gave up and deleted it would otherwise stay for
        good. After the answers, whose replies `_rescue_failed` finds by position."""
        for stream in sorted({r.reply_to for r in requests if self.streams.private(r.reply_to)}):
            pipe.expire(stream, self.streams.reply_ttl_s)

    def _ack(self, entry_ids: list[str]) -> None:
        pipe = self.client.pipeline(transaction=True)
        pipe.xack(self.streams.keys.jobs, self.streams.group, *entry_ids)
        pipe.xdel(self.streams.keys.jobs, *entry_ids)
        pipe.execute()

    def _rescue_failed(self, requests: list[JobRequest], results: list[dict[str, str]],
                       replies: list[object]) -> None:
        """A result its reply_to refused (a key of another type) goes to the default
        result stream instead: the job is acknowledged already, so it must land."""
        for index, (request, result) in enumerate(zip(requests, results, strict=True)):
            failure = replies[3 * index]
            if not isinstance(failure, redis.ResponseError):
                continue
            log.warning("cannot write the result of job %s to %s (%s); writing it to %s",
                        request.job_id, request.reply_to, failure, self.streams.keys.results,
                        extra={"job_id": request.job_id})
            error = {"code": "reply_failed",
                     "message": f"result stream {request.reply_to!r} refused it: {failure}"}
            self._publish_to_default({**result, "status": "error", "error": json.dumps(error),
                                      "reply_to": request.reply_to})

    def _publish_to_default(self, result: dict[str, str]) -> None:
        self.outage.retry(lambda: self.client.xadd(
            self.streams.keys.results, result,  # type: ignore[arg-type]
            maxlen=self.streams.results_maxlen, approximate=True))


def entry_time_ms(entry_id: str) -> Optional[int]:
    """The server time (ms) in an auto-generated entry id, e.g. 1712345678901-0."""
    head = entry_id.partition("-")[0]
    return int(head) if head.isdigit() else None


def queue_wait_ms(entry_id: str) -> float:
    """How long a job waited in the stream before it was read (0 when unknown)."""
    added = entry_time_ms(entry_id)
    return 0.0 if added is None else max(0.0, time.time() * 1000 - added)
