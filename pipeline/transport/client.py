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
from pipeline.transport.contract import Keys, reply_text
from pipeline.transport.shards import hash_tag, shard_of, stream_in_shard

DEFAULT_GROUP = "imgpipe"
DEAD_PAGE = 100  # dead letters read per XRANGE while retrying them all
_DEAD_FIELDS = frozenset(contract.DEAD_FIELDS)
# A dead letter's id: with shards, its shard's index first ("1/1716200000000-0").
DEAD_ID = re.compile(r"^(?:([0-9]+)/)?([0-9]+(?:-[0-9]+)?)$")
# How long one blocking read of a result stream in several shards waits on
# each in turn: a result in another shard waits at most about this long.
SHARD_BLOCK_MS = 100
Entry = tuple[str, dict[str, Any]]


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


@dataclass
class Shard:
    """One shard as the client sees it: its keys and a connection to its server."""

    index: int
    keys: Keys
    cfg: RedisSettings  # url: this shard's server
    location: str
    conn: redis.Redis
    # Blocking reads get their own connection, its socket timeout covering the block.
    reader: Optional[redis.Redis] = None
    reader_block_ms: int = 0

    def blocking(self, block_ms: int) -> redis.Redis:
        """The connection for a read blocking `block_ms` (0: the plain one)."""
        if block_ms == 0:
            return self.conn
        if self.reader is None or self.reader_block_ms < block_ms:
            if self.reader is not None:
                self.reader.close()
            self.reader = connect(self.cfg, extra_timeout_s=block_ms / 1000)
            self.reader_block_ms = block_ms
        return self.reader

    def close(self) -> None:
        for conn in (self.conn, self.reader):
            if conn is not None:
                with contextlib.suppress(redis.RedisError):
                    conn.close()
        self.reader = None


class Client:
    """Jobs in, results out, over the Redis in `cfg`; the daemon reads as `group`."""

    def __init__(self, cfg: RedisSettings, group: str = DEFAULT_GROUP) -> None:
        # With shards, `keys` are the family names that stand for every shard's.
        self.keys = contract.Keys(cfg.prefix)
        self.group = group
        self._cfg = cfg
        self.shards = [self._shard(cfg, index) for index in range(cfg.shards)]
        self.location = ", ".join(dict.fromkeys(shard.location for shard in self.shards))
        self._redis = self.shards[0].conn

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
        with self._translated(shard.location):
            shard.conn.xadd(shard.keys.jobs, fields)
        return job_id

    def submit_many(self, jobs: Iterable[Mapping[str, Any]], *, chunk: int = 500) -> list[str]:
        """Queue jobs (each the keyword arguments of `submit`), one round trip per chunk.

        Not transactional: a failure part-way leaves the earlier chunks queued.
        Only one chunk of jobs per shard is held at a time, so `jobs` may be a generator.
        """
        if chunk < 1:
            raise ValueError("chunk must be at least 1")
        ids: list[str] = []
        pipes: dict[int, Any] = {}
        for job in jobs:
            job_id = job.get("job_id") or new_job_id()
            shard = self.shard_for(job_id)
            fields: dict[Any, Any] = contract.job_fields(**{
                **job, "job_id": job_id, "reply_to": self._reply_in(shard, job.get("reply_to"))})
            pipe = pipes.setdefault(shard.index, shard.conn.pipeline(transaction=False))
            pipe.xadd(shard.keys.jobs, fields)
            ids.append(job_id)
            if len(pipe) >= chunk:
                self._execute(pipe, shard.location)
        for index, pipe in pipes.items():
            self._execute(pipe, self.shards[index].location)
        return ids

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
        return Follower(self, self._placed(stream), after)

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
                entries: Any = shard.conn.xrange(shard.keys.dead, count=count)
            letters += [(_entry_order(reply_text(entry_id)), self._dead_id(shard, entry_id),
                         _decode_dead(fields)) for entry_id, fields in entries]
        letters.sort(key=lambda letter: letter[0])
        return [(dead_id, letter) for _, dead_id, letter in letters[:count]]

    def _dead_id(self, shard: Shard, entry_id: Any) -> str:
        text = reply_text(entry_id)
        return text if len(self.shards) == 1 else f"{shard.index}/{text}"

    def dead_retry(self, entry_ids: Optional[Iterable[str]] = None) -> int:
        """Queue dead letters (all when None) as jobs again, each in its own
        shard; how many were moved."""
        if entry_ids is None:
            return sum(self._retry_one(shard, entry_id) for shard in self.shards
                       for entry_id in self._all_dead_ids(shard))
        letters = list(self._checked_ids(entry_ids))
        return sum(self._retry_one(shard, entry_id) for shard, entry_id in letters)

    def _checked_ids(self, dead_ids: Iterable[str]) -> Iterator[tuple[Shard, str]]:
        # Checked up front: a typo must not fail half-way through the list.
        ids = list(dead_ids)
        bad = [dead_id for dead_id in ids if self._shard_of_dead(dead_id) is None]
        if bad:
            example = "1716200000000-0" if len(self.shards) == 1 else "1/1716200000000-0"
            raise ValueError(f"not dead letter ids: {', '.join(map(repr, bad[:5]))} (ids look "
                             f"like {example}; dead_list shows them)")
        for dead_id in ids:
            shard = self._shard_of_dead(dead_id)
            assert shard is not None
            yield shard, dead_id.rpartition("/")[2]

    def _shard_of_dead(self, dead_id: str) -> Optional[Shard]:
        """The shard a dead letter id names; None when it is malformed or names none."""
        match = DEAD_ID.match(dead_id)
        if match is None or (match.group(1) is None) != (len(self.shards) == 1):
            return None
        index = int(match.group(1) or 0)
        return self.shards[index] if index < len(self.shards) else None

    def _all_dead_ids(self, shard: Shard) -> Iterator[str]:
        """Every dead letter's id in `shard` up to the newest now, a page at a time.

        Letters that die while we retry (a retried job failing again) wait for
        the next call, so this ends.
        """
        with self._translated(shard.location):
            newest: Any = shard.conn.xrevrange(shard.keys.dead, count=1)
        if not newest:
            return
        start, end = "-", reply_text(newest[0][0])
        while True:
            with self._translated(shard.location):
                page: Any = shard.conn.xrange(shard.keys.dead, start, end, count=DEAD_PAGE)
            if not page:
                return
            yield from (reply_text(entry_id) for entry_id, _ in page)
            start = "(" + reply_text(page[-1][0])

    def _retry_one(self, shard: Shard, entry_id: str) -> bool:
        """Move one dead letter back to its shard's jobs, exactly once even with
        rival retriers."""
        keys = shard.keys
        with self._translated(shard.location), shard.conn.pipeline(transaction=True) as pipe:
            while True:
                try:
                    # WATCH: if another client moves it first, EXEC fails and we look again.
                    pipe.watch(keys.dead)
                    found: Any = pipe.xrange(keys.dead, entry_id, entry_id, count=1)
                    if not found:
                        return False
                    job = {k: v for k, v in found[0][1].items()
                           if reply_text(k) not in _DEAD_FIELDS}
                    pipe.multi()
                    pipe.xadd(keys.jobs, job)
                    pipe.xdel(keys.dead, entry_id)
                    pipe.execute()
                    return True
                except redis.WatchError:
                    continue

    def dead_purge(self) -> int:
        """Delete every dead letter in every shard; how many there were."""
        removed = 0
        for shard in self.shards:
            with self._translated(shard.location):
                # XTRIM, not DEL: a key of another type under the prefix is refused, not lost.
                removed += int(shard.conn.xtrim(shard.keys.dead, maxlen=0, approximate=False))
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


class Follower:
    """Reads one result stream, held by one shard or by each, from a cursor per
    shard: entry ids of different streams are not comparable."""

    def __init__(self, client: Client, placed: list[tuple[Shard, str]], after: str) -> None:
        self._client = client
        self._placed = placed
        self._cursors = [after] * len(placed)
        self._turn = 0  # the shard a blocking read waits on next: turns go round

    def read(self, block_ms: int = 0, count: int = 100) -> list[Entry]:
        """Entries after the cursors (up to `count` per shard); with `block_ms`,
        waiting up to that long for one when there are none."""
        entries = [entry for index in range(len(self._placed))
                   for entry in self._read_at(index, 0, count)]
        if entries or block_ms == 0:
            return entries
        if len(self._placed) == 1:
            return self._read_at(0, block_ms, count)
        # One blocking read per server at a time: wait on each shard in turn.
        deadline = time.monotonic() + block_ms / 1000
        while (remaining_ms := int((deadline - time.monotonic()) * 1000)) > 0:
            index, self._turn = self._turn, (self._turn + 1) % len(self._placed)
            entries = self._read_at(index, min(remaining_ms, SHARD_BLOCK_MS), count)
            if entries:
                return entries
        return []

    def _read_at(self, index: int, block_ms: int, count: int) -> list[Entry]:
        shard, stream = self._placed[index]
        entries = self._client._read_one(shard, stream, self._cursors[index], block_ms, count)
        if entries:
            self._cursors[index] = entries[-1][0]
        return entries


def new_job_id() -> str:
    return uuid.uuid4().hex


def _whole_seconds(seconds: float) -> int:
    return max(1, math.ceil(seconds))


def _entry_order(entry_id: str) -> tuple[int, int]:
    """An entry id as a sortable pair: (milliseconds, sequence)."""
    ms, _, seq = entry_id.partition("-")
    return (int(ms) if ms.isdigit() else 0, int(seq) if seq.isdigit() else 0)


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
