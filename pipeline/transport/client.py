"""The client side of the Redis wire contract: submit jobs, read results, mind the queue.

The `imgpipe submit/status/dead` commands are thin wrappers over `Client`.
Unlike the daemon, the client does not ride out outages: an unreachable
server raises TransientError at once, naming host:port (never the URL, which
may hold a password), and the caller decides whether to try again.

Replication is asynchronous, so a job the primary took may be lost with it in
a failover. With `redis.submit_wait_replicas` (by default 1 when the primary
has a replica connected) a submit counts only once that many replicas hold
it (WAIT); one short of them is sent again, the same job ids, and after
SUBMIT_TRIES raises NotReplicated. The daemon may so answer a job twice (at
least once).
"""

from __future__ import annotations

import contextlib
import json
import math
import re
import time
import uuid
from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import redis

from pipeline.config import RedisSettings, Settings
from pipeline.errors import ConfigError, ImgpipeError, TransientError
from pipeline.transport import contract
from pipeline.transport.connection import (
    DENIED,
    OUTAGE_ERRORS,
    connect,
    denial,
    describe_url,
    server_reason,
)
from pipeline.transport.contract import reply_text

DEFAULT_GROUP = "imgpipe"
DEAD_PAGE = 100  # dead letters read per XRANGE while retrying them all
SUBMIT_TRIES = 3  # sends of one batch, in all, while too few replicas confirm it
_DEAD_FIELDS = frozenset(contract.DEAD_FIELDS)
ENTRY_ID = re.compile(r"^[0-9]+(-[0-9]+)?$")
Entry = tuple[str, dict[str, Any]]


class NotReplicated(TransientError):
    """The primary took a batch of jobs but too few replicas confirmed it in time:
    the jobs are queued, but may be lost with the primary. Submitting the same
    job ids again is safe (they may then be answered twice)."""

    def __init__(self, message: str, job_ids: list[str], acknowledged: int,
                 wanted: int) -> None:
        super().__init__(message)
        self.job_ids = job_ids
        self.acknowledged = acknowledged
        self.wanted = wanted


@dataclass(frozen=True)
class Consumer:
    """One consumer of the jobs group, as XINFO CONSUMERS reports it."""

    name: str
    pending: int
    idle_ms: int


@dataclass(frozen=True)
class Status:
    """The queue at a glance; all zeros (and no group) on an empty Redis."""

    group: str
    group_exists: bool
    jobs: int  # entries in <prefix>:jobs: finished jobs are deleted, so all unfinished
    pending: int  # delivered to a consumer, not acknowledged yet
    lag: int  # not delivered to any consumer yet
    dead: int
    results: int  # entries in the default result stream
    consumers: list[Consumer] = field(default_factory=list)


class Client:
    """Jobs in, results out, over the Redis in `cfg`; the daemon reads as `group`."""

    def __init__(self, cfg: RedisSettings, group: str = DEFAULT_GROUP) -> None:
        self.location = describe_url(cfg.url)
        self.keys = contract.Keys(cfg.prefix)
        self.group = group
        self._cfg = cfg
        self._redis = connect(cfg)
        # Asked of the primary at the first submit ("auto"), then kept.
        self._wait_replicas: Optional[int] = (
            None if cfg.submit_wait_replicas == "auto" else cfg.submit_wait_replicas)
        # Blocking reads get their own connection, its socket timeout covering the block.
        self._reader: Optional[redis.Redis] = None
        self._reader_block_ms = 0

    @classmethod
    def from_settings(cls, settings: Settings) -> Client:
        return cls(settings.redis, settings.serve.group)

    def close(self) -> None:
        for conn in (self._redis, self._reader):
            if conn is not None:
                with contextlib.suppress(redis.RedisError):
                    conn.close()
        self._reader = None

    def __enter__(self) -> Client:
        return self

    def __exit__(self, *exc_info: object) -> None:
        self.close()

    # -- jobs ---------------------------------------------------------------

    def submit(self, image: Optional[str] = None, data: Optional[bytes] = None, *,
               job_id: Optional[str] = None, topk: Optional[int] = None,
               reply_to: Optional[str] = None, deadline_ms: Optional[int] = None,
               model: Optional[str] = None, url: Optional[str] = None,
               tta: Optional[str] = None, output: Optional[str] = None) -> str:
        """Queue one job (exactly one of image, data and url); its job id. `tta`
        asks for test-time augmentation ("hflip", "five_crop", "ten_crop"),
        `output` for "embedding" or "both" (`contract.embedding_of` decodes it)."""
        job_id = job_id or new_job_id()
        fields: dict[Any, Any] = contract.job_fields(
            image=image, data=data, job_id=job_id, topk=topk, reply_to=reply_to,
            deadline_ms=deadline_ms, model=model, url=url, tta=tta, output=output)
        self._queue([job_id], [fields])
        return job_id

    def submit_many(self, jobs: Iterable[Mapping[str, Any]], *, chunk: int = 500) -> list[str]:
        """Queue jobs (each the keyword arguments of `submit`), one round trip per chunk.

        Not transactional: a failure part-way leaves the earlier chunks queued
        (NotReplicated names the chunk's job ids). Only one chunk of jobs is
        held at a time, so `jobs` may be a generator.
        """
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        ids: list[str] = []
        batch_ids: list[str] = []
        batch: list[dict[Any, Any]] = []
        for job in jobs:
            job_id = job.get("job_id") or new_job_id()
            batch.append(contract.job_fields(**{**job, "job_id": job_id}))
            batch_ids.append(job_id)
            if len(batch) >= chunk:
                self._queue(batch_ids, batch)
                ids += batch_ids
                batch_ids, batch = [], []
        if batch:
            self._queue(batch_ids, batch)
        return ids + batch_ids

    def _queue(self, job_ids: list[str], batch: list[dict[Any, Any]]) -> None:
        """XADD `batch` in one round trip; with replicas to wait for, WAIT for them
        in the same round trip (on the same connection, as WAIT requires), and
        send the batch again while too few confirm it."""
        replicas = self.replicas_to_wait_for()
        timeout_ms = self._cfg.submit_wait_timeout_ms
        acknowledged = 0
        for _ in range(SUBMIT_TRIES):
            pipe = self._redis.pipeline(transaction=False)
            for fields in batch:
                pipe.xadd(self.keys.jobs, fields)
            if replicas:
                pipe.wait(replicas, timeout_ms)
            replies = self._execute(pipe)
            if not replicas:
                return
            acknowledged = int(replies[-1])
            if acknowledged >= replicas:
                return
        raise NotReplicated(
            f"Redis at {self.location}: {acknowledged} of {replicas} replicas acknowledged "
            f"{len(batch)} jobs within {timeout_ms} ms, {SUBMIT_TRIES} tries; they are queued "
            "on the primary but may be lost with it (check its replicas, or set "
            "redis.submit_wait_replicas)", job_ids, acknowledged, replicas)

    def replicas_to_wait_for(self) -> int:
        """redis.submit_wait_replicas; for "auto", asked of the primary once: 1 when it
        has a replica connected, else 0 (no WAIT)."""
        if self._wait_replicas is None:
            with self._translated():
                self._wait_replicas = min(1, self._connected_replicas())
        return self._wait_replicas

    def _connected_replicas(self) -> int:
        try:
            info: Any = self._redis.info("replication")
        except redis.exceptions.NoPermissionError:
            return 0  # a user without INFO: no replica we know of, as before WAIT existed
        return int(info.get("connected_slaves", 0))

    # -- results ------------------------------------------------------------

    def reply_stream(self, ttl_s: Optional[float] = None) -> str:
        """A fresh stream name for one caller's results (`reply_to`), under the prefix.

        With `ttl_s` the stream is made now, empty, and expires `ttl_s` after
        this call or the last `keep_stream`: a caller that dies before
        `delete_stream` leaves nothing behind for long. (Results written to a
        stream keep its expiry; one written after it expired makes a new stream
        that does not expire.)
        """
        name = f"{self.keys.results}:{uuid.uuid4().hex}"
        if ttl_s is not None:
            with self._translated():
                pipe = self._redis.pipeline(transaction=True)
                pipe.xadd(name, {"v": str(contract.VERSION)}, maxlen=0)  # a stream with no entries
                pipe.expire(name, _whole_seconds(ttl_s))
                self._execute(pipe)
        return name

    def keep_stream(self, name: str, ttl_s: float) -> None:
        """Expire stream `name` `ttl_s` from now instead (while its reader still reads)."""
        with self._translated():
            self._redis.expire(name, _whole_seconds(ttl_s))

    def delete_stream(self, name: str) -> None:
        with self._translated():
            self._redis.delete(name)

    def results(self, stream: Optional[str] = None, *, after: str = "0-0",
                block_ms: int = 1000, count: int = 100) -> Generator[Entry, None, None]:
        """(entry id, decoded result) from `stream` after `after`, following it forever."""
        if block_ms < 1:
            raise ValueError("block_ms must be at least 1 (0 would block forever)")
        stream = stream or self.keys.results
        while True:
            for entry_id, result in self.read(stream, after, block_ms, count):
                after = entry_id
                yield entry_id, result

    def wait(self, job_ids: Iterable[str], *, stream: str, timeout_s: float,
             after: str = "0-0", count: int = 100) -> dict[str, dict[str, Any]]:
        """The first result of each of `job_ids` in `stream`, by job id.

        Returns when all arrived or `timeout_s` passed, with what arrived; the
        caller reports the missing ones.
        """
        wanted = set(job_ids)
        found: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        while len(found) < len(wanted):
            block_ms = max(0, int((deadline - time.monotonic()) * 1000))
            entries = self.read(stream, after, block_ms, count)
            for _, result in entries:
                job_id = result.get("job_id")
                if job_id in wanted and job_id not in found:
                    found[job_id] = result
            if entries:
                after = entries[-1][0]
            elif block_ms == 0:
                break
        return found

    def read(self, stream: str, after: str = "0-0", block_ms: int = 0,
             count: int = 100) -> list[Entry]:
        """One XREAD of entries after `after`; block_ms 0 means do not block."""
        with self._translated():
            reply: Any = self._blocking(block_ms).xread(
                {stream: after}, count=count, block=block_ms or None)
        if not reply:
            return []
        _, entries = reply[0]
        return [(reply_text(entry_id), contract.decode_result(fields))
                for entry_id, fields in entries]

    def _blocking(self, block_ms: int) -> redis.Redis:
        if block_ms == 0:
            return self._redis
        if self._reader is None or self._reader_block_ms < block_ms:
            if self._reader is not None:
                self._reader.close()
            self._reader = connect(self._cfg, extra_timeout_s=block_ms / 1000)
            self._reader_block_ms = block_ms
        return self._reader

    # -- status -------------------------------------------------------------

    def status(self) -> Status:
        """Queue lengths and the group's consumers; a missing stream or group is no error."""
        with self._translated():
            pipe = self._redis.pipeline(transaction=False)
            for key in (self.keys.jobs, self.keys.dead, self.keys.results):
                pipe.xlen(key)
            jobs, dead, results = self._execute(pipe)
            group = self._group_info()
            consumers = self._consumers() if group is not None else []
        if group is None:  # nobody has read: every job waits
            return Status(self.group, False, jobs, 0, jobs, dead, results)
        pending = int(group["pending"])
        lag = group.get("lag")
        # Redis cannot always count the lag (entries deleted mid-stream): every
        # unfinished job is still in the stream, so the rest were never delivered.
        lag = int(lag) if lag is not None else max(0, jobs - pending)
        return Status(self.group, True, jobs, pending, lag, dead, results, consumers)

    def _group_info(self) -> Optional[dict[str, Any]]:
        try:
            groups: Any = self._redis.xinfo_groups(self.keys.jobs)
        except redis.ResponseError:  # no such stream
            return None
        return next((g for g in groups if reply_text(g["name"]) == self.group), None)

    def _consumers(self) -> list[Consumer]:
        rows: Any = self._redis.xinfo_consumers(self.keys.jobs, self.group)
        return [Consumer(reply_text(row["name"]), int(row["pending"]), int(row["idle"]))
                for row in rows]

    # -- dead letters -------------------------------------------------------

    def dead_list(self, count: int = 100) -> list[Entry]:
        """The oldest `count` dead letters, readable: `data` as its length, error parsed."""
        with self._translated():
            entries: Any = self._redis.xrange(self.keys.dead, count=count)
        return [(reply_text(entry_id), _decode_dead(fields)) for entry_id, fields in entries]

    def dead_retry(self, entry_ids: Optional[Iterable[str]] = None) -> int:
        """Queue dead letters (all when None) as jobs again; how many were moved."""
        ids = self._all_dead_ids() if entry_ids is None else _checked_ids(entry_ids)
        with self._translated():
            return sum(self._retry_one(entry_id) for entry_id in ids)

    def _all_dead_ids(self) -> Iterator[str]:
        """Every dead letter's id up to the newest now, a page at a time.

        Letters that die while we retry (a retried job failing again) wait for
        the next call, so this ends.
        """
        with self._translated():
            newest: Any = self._redis.xrevrange(self.keys.dead, count=1)
        if not newest:
            return
        start, end = "-", reply_text(newest[0][0])
        while True:
            with self._translated():
                page: Any = self._redis.xrange(self.keys.dead, start, end, count=DEAD_PAGE)
            if not page:
                return
            yield from (reply_text(entry_id) for entry_id, _ in page)
            start = "(" + reply_text(page[-1][0])

    def _retry_one(self, entry_id: str) -> bool:
        """Move one dead letter back to the jobs, exactly once even with rival retriers."""
        with self._redis.pipeline(transaction=True) as pipe:
            while True:
                try:
                    # WATCH: if another client moves it first, EXEC fails and we look again.
                    pipe.watch(self.keys.dead)
                    found: Any = pipe.xrange(self.keys.dead, entry_id, entry_id, count=1)
                    if not found:
                        return False
                    job = {k: v for k, v in found[0][1].items()
                           if reply_text(k) not in _DEAD_FIELDS}
                    pipe.multi()
                    pipe.xadd(self.keys.jobs, job)
                    pipe.xdel(self.keys.dead, entry_id)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def dead_purge(self) -> int:
        """Delete every dead letter; how many there were."""
        with self._translated():
            # XTRIM, not DEL: a key of another type under the prefix is refused, not lost.
            return int(self._redis.xtrim(self.keys.dead, maxlen=0, approximate=False))

    # -- plumbing -----------------------------------------------------------

    def _execute(self, pipe: Any) -> list[Any]:
        with self._translated():
            return list(pipe.execute())

    @contextlib.contextmanager
    def _translated(self) -> Iterator[None]:
        """redis-py's connection failures as imgpipe errors naming host:port only."""
        try:
            yield
        except DENIED as exc:  # before OUTAGE_ERRORS: a refused login is a ConnectionError
            raise denial(self.location, exc) from exc
        except OUTAGE_ERRORS as exc:
            # redis-py's messages name host:port, never the password.
            raise TransientError(f"Redis at {self.location} unavailable "
                                 f"({type(exc).__name__}: {exc})") from exc
        except redis.ResponseError as exc:
            raise self._refused(exc) from exc

    def _refused(self, exc: redis.ResponseError) -> ImgpipeError:
        """A command the server refused, as one line naming the reason."""
        reason = server_reason(exc)
        if reason.startswith("WRONGTYPE"):
            return ConfigError(f"Redis at {self.location}: a key under the prefix "
                               f"{self.keys.prefix!r} is not a stream ({reason}); "
                               "use another redis.prefix")
        return TransientError(f"Redis at {self.location} refused the command: {reason}")


def new_job_id() -> str:
    return uuid.uuid4().hex


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def _checked_ids(entry_ids: Iterable[str]) -> Iterator[str]:
    # Checked up front: a typo must not fail half-way through the list.
    ids = list(entry_ids)
    bad = [entry_id for entry_id in ids if not ENTRY_ID.match(entry_id)]
    if bad:
        raise ValueError(f"not stream entry ids: {', '.join(map(repr, bad[:5]))}")
    return iter(ids)


def _decode_dead(fields: Mapping[bytes, bytes]) -> dict[str, Any]:
    """A dead letter for people: text as str, `data` as its size, error and count parsed."""
    decoded: dict[str, Any] = {}
    for raw_name, value in fields.items():
        name = reply_text(raw_name)
        if name == "data":
            decoded[name] = f"<{len(value)} bytes>"
        elif name == "error":
            decoded[name] = _json_orreply_text(value)
        elif name == "deliveries" and value.isdigit():
            decoded[name] = int(value)
        else:
            decoded[name] = reply_text(value)
    return decoded


def _json_orreply_text(value: bytes) -> Any:
    # A dead letter is shown even if its error is not the JSON the contract promises.
    try:
        return json.loads(value)
    except ValueError:
        return reply_text(value)
