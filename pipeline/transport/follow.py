"""The client's side of shards: a connection to each, and a result stream read
across the shards that hold it.

A result stream named under the prefix without a hash tag stands for one
stream per shard (`shards.stream_in_shard`); entry ids of two streams are not
comparable, so a `Follower` keeps a cursor per shard, and as one blocking
read waits on one server, it blocks on each shard in turn, briefly.
"""

from __future__ import annotations

import contextlib
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Optional

import redis

from pipeline.config import RedisSettings
from pipeline.transport.connection import connect
from pipeline.transport.contract import Keys

# How long one blocking read of a result stream in several shards waits on
# each in turn: a result in another shard waits at most about this long.
SHARD_BLOCK_MS = 100
Entry = tuple[str, dict[str, Any]]


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


ReadOne = Callable[[Shard, str, str, int, int], list[Entry]]  # shard, stream, after, block, count


class Follower:
    """Reads one result stream, held by one shard or by each, from a cursor per
    shard: entry ids of different streams are not comparable."""

    def __init__(self, read_one: ReadOne, placed: list[tuple[Shard, str]], after: str) -> None:
        self._read_one = read_one
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
        entries = self._read_one(shard, stream, self._cursors[index], block_ms, count)
        if entries:
            self._cursors[index] = entries[-1][0]
        return entries
