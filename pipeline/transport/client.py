"""The client side of the Redis wire contract: submit jobs, read results, mind the queue.

The `imgpipe submit/status/dead` commands are thin wrappers over `Client`.
With shards (`redis.shards`), jobs are spread over them by job id, and a
result stream named under the prefix without a hash tag (the default one, a
`reply_stream`) stands for that stream in every shard: `follow`, `wait`,
`results`, `keep_stream` and `delete_stream` take such a name and act on
every shard; `status` and the dead letters cover every shard too.
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
import math
import time
import uuid
from collections.abc import Generator, Iterable, Iterator, Mapping
from dataclasses import dataclass, field
from typing import Any, Optional

import redis

from pipeline.config import RedisSettings, Settings
from pipeline.errors import ConfigError, ImgpipeError, TransientError
from pipeline.transport import contract, dead_letters
from pipeline.transport.connection import (
    DENIED,
    OUTAGE_ERRORS,
    connect,
    denial,
    describe_url,
    server_reason,
)
from pipeline.transport.contract import Keys, reply_text
from pipeline.transport.follow import Entry, Follower, Shard
from pipeline.transport.shards import hash_tag, shard_of, stream_in_shard

DEFAULT_GROUP = "imgpipe"
SUBMIT_TRIES = 3  # sends of one batch, in all, while too few replicas confirm it


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
    jobs_stream: str = ""  # the jobs stream these figures are of (every shard's: its family)
    shards: list[Status] = field(default_factory=list)  # each shard's figures, with shards


class Client:
    """Jobs in, results out, over the Redis in `cfg`; the daemon reads as `group`."""

    def __init__(self, cfg: RedisSettings, group: str = DEFAULT_GROUP) -> None:
        # With shards, `keys` are the family names that stand for every shard's.
        self.keys = contract.Keys(cfg.prefix)
        self.group = group
        self._cfg = cfg
        self.shards = [self._shard(cfg, index) for index in range(cfg.shards)]
        self.location = ", ".join(dict.fromkeys(shard.location for shard in self.shards))
        # Per shard, asked of its primary at the first submit ("auto"), then kept.
        self._wait_replicas: dict[int, int] = {}

    @staticmethod
    def _shard(cfg: RedisSettings, index: int) -> Shard:
        shard_cfg = cfg.for_shard(index)
        return Shard(index, Keys.of_shard(cfg.prefix, index, cfg.shards), shard_cfg,
                     describe_url(shard_cfg.url), connect(shard_cfg))

    @classmethod
    def from_settings(cls, settings: Settings) -> Client:
        return cls(settings.redis, settings.serve.group)

    def close(self) -> None:
        for shard in self.shards:
            shard.close()

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
        shard = self.shard_for(job_id)
        fields: dict[Any, Any] = contract.job_fields(
            image=image, data=data, job_id=job_id, topk=topk,
            reply_to=self._reply_in(shard, reply_to), deadline_ms=deadline_ms, model=model,
            url=url, tta=tta, output=output)
        self._queue(shard, [job_id], [fields])
        return job_id

    def submit_many(self, jobs: Iterable[Mapping[str, Any]], *, chunk: int = 500) -> list[str]:
        """Queue jobs (each the keyword arguments of `submit`), one round trip per chunk.

        Not transactional: a failure part-way leaves the earlier chunks queued
        (NotReplicated names the chunk's job ids). Only one chunk of jobs per
        shard is held at a time, so `jobs` may be a generator.
        """
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        ids: list[str] = []
        batches: dict[int, tuple[list[str], list[dict[Any, Any]]]] = {}
        for job in jobs:
            job_id = job.get("job_id") or new_job_id()
            shard = self.shard_for(job_id)
            batch_ids, batch = batches.setdefault(shard.index, ([], []))
            batch.append(contract.job_fields(**{
                **job, "job_id": job_id, "reply_to": self._reply_in(shard, job.get("reply_to"))}))
            batch_ids.append(job_id)
            ids.append(job_id)
            if len(batch) >= chunk:
                self._queue(shard, batch_ids, batch)
                del batches[shard.index]
        for index, (batch_ids, batch) in batches.items():
            self._queue(self.shards[index], batch_ids, batch)
        return ids

    def _queue(self, shard: Shard, job_ids: list[str], batch: list[dict[Any, Any]]) -> None:
        """XADD `batch` to `shard` in one round trip; with replicas to wait for, WAIT
        for them in the same round trip (on the same connection, as WAIT requires),
        and send the batch again while too few confirm it."""
        replicas = self.replicas_to_wait_for(shard)
        timeout_ms = self._cfg.submit_wait_timeout_ms
        acknowledged = 0
        for _ in range(SUBMIT_TRIES):
            pipe = shard.conn.pipeline(transaction=False)
            for fields in batch:
                pipe.xadd(shard.keys.jobs, fields)
            if replicas:
                pipe.wait(replicas, timeout_ms)
            replies = self._execute(pipe, shard.location)
            if not replicas:
                return
            acknowledged = int(replies[-1])
            if acknowledged >= replicas:
                return
        raise NotReplicated(
            f"Redis at {shard.location}: {acknowledged} of {replicas} replicas acknowledged "
            f"{len(batch)} jobs within {timeout_ms} ms, {SUBMIT_TRIES} tries; they are queued "
            "on the primary but may be lost with it (check its replicas, or set "
            "redis.submit_wait_replicas)", job_ids, acknowledged, replicas)

    def replicas_to_wait_for(self, shard: Optional[Shard] = None) -> int:
        """redis.submit_wait_replicas for `shard` (the first by default); for "auto",
        asked of its primary once: 1 when it has a replica connected, else 0 (no WAIT)."""
        shard = shard or self.shards[0]
        if self._cfg.submit_wait_replicas != "auto":
            return self._cfg.submit_wait_replicas
        if shard.index not in self._wait_replicas:
            with self._translated(shard.location):
                self._wait_replicas[shard.index] = min(1, _connected_replicas(shard.conn))
        return self._wait_replicas[shard.index]

    def shard_for(self, job_id: str) -> Shard:
        """The shard that job `job_id` goes to (always the same one for an id)."""
        return self.shards[shard_of(job_id, len(self.shards))]

    def _reply_in(self, shard: Shard, reply_to: Optional[str]) -> Optional[str]:
        """`reply_to` in `shard`: a result stream name standing for every shard's
        becomes this shard's; any other must already lie in the shard's hash slot."""
        if reply_to is None or len(self.shards) == 1:
            return reply_to
        placed = stream_in_shard(reply_to, self.keys.prefix, shard.keys.prefix)
        if hash_tag(placed) != hash_tag(shard.keys.prefix):
            raise ValueError(
                f"reply_to {reply_to!r}: with {len(self.shards)} shards a reply stream "
                f"must be named under {self.keys.prefix + ':'!r} without braces "
                f"(Client.reply_stream makes one), or carry the job's shard's hash tag "
                f"{{{shard.index}}}")
        return placed

    # -- results ------------------------------------------------------------

    def reply_stream(self, ttl_s: Optional[float] = None) -> str:
        """A fresh stream name for one caller's results (`reply_to`), under the prefix.

        With `ttl_s` the stream is made now, empty, and expires `ttl_s` after
        this call or the last `keep_stream`: a caller that dies before
        `delete_stream` leaves nothing behind for long. (Results written to a
        stream keep its expiry; one written after it expired makes a new stream
        that does not expire.) With shards the name stands for one stream per shard.
        """
        name = f"{self.keys.results}:{uuid.uuid4().hex}"
        if ttl_s is not None:
            for shard, stream in self._placed(name):
                pipe = shard.conn.pipeline(transaction=True)
                pipe.xadd(stream, {"v": str(contract.VERSION)}, maxlen=0)  # no entries
                pipe.expire(stream, _whole_seconds(ttl_s))
                self._execute(pipe, shard.location)
        return name

    def keep_stream(self, name: str, ttl_s: float) -> None:
        """Expire stream `name` `ttl_s` from now instead (while its reader still reads)."""
        for shard, stream in self._placed(name):
            with self._translated(shard.location):
                shard.conn.expire(stream, _whole_seconds(ttl_s))

    def delete_stream(self, name: str) -> None:
        for shard, stream in self._placed(name):
            with self._translated(shard.location):
                shard.conn.delete(stream)

    def results(self, stream: Optional[str] = None, *, after: str = "0-0",
                block_ms: int = 1000, count: int = 100) -> Generator[Entry, None, None]:
        """(entry id, decoded result) from `stream` after `after`, following it forever."""
        if block_ms < 1:
            raise ValueError("block_ms must be at least 1 (0 would block forever)")
        follower = self.follow(stream or self.keys.results, after)
        while True:
            yield from follower.read(block_ms, count)

    def wait(self, job_ids: Iterable[str], *, stream: str, timeout_s: float,
             after: str = "0-0", count: int = 100) -> dict[str, dict[str, Any]]:
        """The first result of each of `job_ids` in `stream`, by job id.

        Returns when all arrived or `timeout_s` passed, with what arrived; the
        caller reports the missing ones.
        """
        wanted = set(job_ids)
        found: dict[str, dict[str, Any]] = {}
        deadline = time.monotonic() + timeout_s
        follower = self.follow(stream, after)
        while len(found) < len(wanted):
            block_ms = max(0, int((deadline - time.monotonic()) * 1000))
            entries = follower.read(block_ms, count)
            for _, result in entries:
                job_id = result.get("job_id")
                if job_id in wanted and job_id not in found:
                    found[job_id] = result
            if not entries and block_ms == 0:
                break
        return found

    def follow(self, stream: str, after: str = "0-0") -> Follower:
        """A reader of result stream `stream` from after `after`, in every shard
        that holds it, each with a cursor of its own."""
        return Follower(self._read_one, self._placed(stream), after)

    def read(self, stream: str, after: str = "0-0", block_ms: int = 0,
             count: int = 100) -> list[Entry]:
        """One XREAD of entries after `after`; block_ms 0 means do not block. With
        shards, of one shard's stream only (`follow` reads all of them)."""
        placed = self._placed(stream)
        if len(placed) > 1:
            raise ValueError(f"{stream!r} stands for one stream in each of {len(placed)} "
                             "shards, whose entry ids are apart: read it with follow()")
        shard, name = placed[0]
        return self._read_one(shard, name, after, block_ms, count)

    def _read_one(self, shard: Shard, stream: str, after: str, block_ms: int,
                  count: int) -> list[Entry]:
        with self._translated(shard.location):
            reply: Any = shard.blocking(block_ms).xread(
                {stream: after}, count=count, block=block_ms or None)
        if not reply:
            return []
        _, entries = reply[0]
        return [(reply_text(entry_id), contract.decode_result(fields))
                for entry_id, fields in entries]

    def _placed(self, stream: str) -> list[tuple[Shard, str]]:
        """Where stream `stream` lives: in every shard for a name that stands for
        one per shard; else in the shard whose hash tag it carries (the first
        shard when it carries none of theirs)."""
        names = [(shard, stream_in_shard(stream, self.keys.prefix, shard.keys.prefix))
                 for shard in self.shards]
        if len(names) > 1 and names[0][1] != names[1][1]:
            return names
        tag = hash_tag(stream)
        owner = next((s for s in self.shards if hash_tag(s.keys.prefix) == tag), None)
        return [(owner or self.shards[0], stream)]

    # -- status -------------------------------------------------------------

    def status(self) -> Status:
        """Queue lengths and the group's consumers, summed over the shards (each
        shard's figures in `shards` when there are several); a missing stream or
        group is no error."""
        each = [self._shard_status(shard) for shard in self.shards]
        if len(each) == 1:
            return each[0]
        consumers: dict[str, Consumer] = {}
        for consumer in (c for status in each for c in status.consumers):
            seen = consumers.get(consumer.name)
            consumers[consumer.name] = consumer if seen is None else Consumer(
                consumer.name, seen.pending + consumer.pending,
                min(seen.idle_ms, consumer.idle_ms))
        return Status(self.group, any(s.group_exists for s in each),
                      jobs=sum(s.jobs for s in each), pending=sum(s.pending for s in each),
                      lag=sum(s.lag for s in each), dead=sum(s.dead for s in each),
                      results=sum(s.results for s in each),
                      consumers=list(consumers.values()), jobs_stream=self.keys.jobs,
                      shards=each)

    def _shard_status(self, shard: Shard) -> Status:
        keys = shard.keys
        with self._translated(shard.location):
            pipe = shard.conn.pipeline(transaction=False)
            for key in (keys.jobs, keys.dead, keys.results):
                pipe.xlen(key)
            jobs, dead, results = self._execute(pipe, shard.location)
            group = self._group_info(shard)
            consumers = self._consumers(shard) if group is not None else []
        if group is None:  # nobody has read: every job waits
            return Status(self.group, False, jobs, 0, jobs, dead, results, jobs_stream=keys.jobs)
        pending = int(group["pending"])
        lag = group.get("lag")
        # Redis cannot always count the lag (entries deleted mid-stream): every
        # unfinished job is still in the stream, so the rest were never delivered.
        lag = int(lag) if lag is not None else max(0, jobs - pending)
        return Status(self.group, True, jobs, pending, lag, dead, results, consumers,
                      jobs_stream=keys.jobs)

    def _group_info(self, shard: Shard) -> Optional[dict[str, Any]]:
        try:
            groups: Any = shard.conn.xinfo_groups(shard.keys.jobs)
        except redis.ResponseError:  # no such stream
            return None
        return next((g for g in groups if reply_text(g["name"]) == self.group), None)

    def _consumers(self, shard: Shard) -> list[Consumer]:
        rows: Any = shard.conn.xinfo_consumers(shard.keys.jobs, self.group)
        return [Consumer(reply_text(row["name"]), int(row["pending"]), int(row["idle"]))
                for row in rows]

    # -- dead letters -------------------------------------------------------

    def dead_list(self, count: int = 100) -> list[Entry]:
        """The oldest `count` dead letters over every shard, readable: `data` as
        its length, error parsed. With shards an id names its shard: "1/<entry id>"."""
        letters = []
        for shard in self.shards:
            with self._translated(shard.location):
                letters += [(order, self._dead_id(shard, entry_id), letter) for
                            order, entry_id, letter in dead_letters.oldest(
                                shard.conn, shard.keys, count)]
        letters.sort(key=lambda letter: letter[0])
        return [(dead_id, letter) for _, dead_id, letter in letters[:count]]

    def _dead_id(self, shard: Shard, entry_id: str) -> str:
        return entry_id if len(self.shards) == 1 else f"{shard.index}/{entry_id}"

    def dead_retry(self, entry_ids: Optional[Iterable[str]] = None) -> int:
        """Queue dead letters (all when None) as jobs again, each in its own
        shard; how many were moved."""
        moved = 0
        for shard, ids in self._dead_ids_by_shard(entry_ids):
            with self._translated(shard.location):
                moved += sum(dead_letters.retry(shard.conn, shard.keys, entry_id)
                             for entry_id in ids)
        return moved

    def _dead_ids_by_shard(self, dead_ids: Optional[Iterable[str]]
                           ) -> Iterator[tuple[Shard, Iterable[str]]]:
        if dead_ids is None:
            yield from ((shard, dead_letters.all_ids(shard.conn, shard.keys))
                        for shard in self.shards)
            return
        # Checked up front: a typo must not fail half-way through the list.
        ids = list(dead_ids)
        parsed = [dead_letters.parse_id(dead_id, len(self.shards)) for dead_id in ids]
        bad = [dead_id for dead_id, place in zip(ids, parsed, strict=True) if place is None]
        if bad:
            example = "1716200000000-0" if len(self.shards) == 1 else "1/1716200000000-0"
            raise ValueError(f"not dead letter ids: {', '.join(map(repr, bad[:5]))} (ids look "
                             f"like {example}; dead_list shows them)")
        for shard in self.shards:
            yield shard, [place[1] for place in parsed if place and place[0] == shard.index]

    def dead_purge(self) -> int:
        """Delete every dead letter in every shard; how many there were."""
        removed = 0
        for shard in self.shards:
            with self._translated(shard.location):
                removed += dead_letters.purge(shard.conn, shard.keys)
        return removed

    # -- plumbing -----------------------------------------------------------

    def _execute(self, pipe: Any, location: Optional[str] = None) -> list[Any]:
        with self._translated(location):
            return list(pipe.execute())

    @contextlib.contextmanager
    def _translated(self, location: Optional[str] = None) -> Iterator[None]:
        """redis-py's connection failures as imgpipe errors naming host:port only
        (`location`: the shard's server; default: every server)."""
        location = location or self.location
        try:
            yield
        except DENIED as exc:  # before OUTAGE_ERRORS: a refused login is a ConnectionError
            raise denial(location, exc) from exc
        except OUTAGE_ERRORS as exc:
            # redis-py's messages name host:port, never the password.
            raise TransientError(f"Redis at {location} unavailable "
                                 f"({type(exc).__name__}: {exc})") from exc
        except redis.ResponseError as exc:
            raise self._refused(exc, location) from exc

    def _refused(self, exc: redis.ResponseError, location: str) -> ImgpipeError:
        """A command the server refused, as one line naming the reason."""
        reason = server_reason(exc)
        if reason.startswith("WRONGTYPE"):
            return ConfigError(f"Redis at {location}: a key under the prefix "
                               f"{self.keys.prefix!r} is not a stream ({reason}); "
                               "use another redis.prefix")
        return TransientError(f"Redis at {location} refused the command: {reason}")


def _connected_replicas(conn: redis.Redis) -> int:
    try:
        info: Any = conn.info("replication")
    except redis.exceptions.NoPermissionError:
        return 0  # a user without INFO: no replica we know of, as before WAIT existed
    return int(info.get("connected_slaves", 0))


def new_job_id() -> str:
    return uuid.uuid4().hex


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))
