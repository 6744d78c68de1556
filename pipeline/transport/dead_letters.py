"""One shard's dead letters (`<prefix>:dead`): read for people, moved back to
the jobs exactly once, purged. `Client` runs these on every shard, with its
errors translated; a dead letter's id there names its shard ("1/<entry id>")
when there are several.
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator, Mapping
from typing import Any, Optional

import redis

from pipeline.transport import contract
from pipeline.transport.contract import Keys, reply_text

DEAD_PAGE = 100  # dead letters read per XRANGE while retrying them all
_DEAD_FIELDS = frozenset(contract.DEAD_FIELDS)
# A dead letter's id: with shards, its shard's index first ("1/1716200000000-0").
DEAD_ID = re.compile(r"^(?:([0-9]+)/)?([0-9]+(?:-[0-9]+)?)$")
Letter = tuple[tuple[int, int], str, dict[str, Any]]  # (order, entry id, letter)


def parse_id(dead_id: str, shards: int) -> Optional[tuple[int, str]]:
    """(shard index, entry id) of a dead letter id; None when it is malformed,
    names no shard, or leaves its shard out where there are several."""
    match = DEAD_ID.match(dead_id)
    if match is None or (match.group(1) is None) != (shards == 1):
        return None
    index = int(match.group(1) or 0)
    return (index, match.group(2)) if index < shards else None


def oldest(conn: redis.Redis, keys: Keys, count: int) -> list[Letter]:
    """The oldest `count` letters, readable, each with its place in time to merge by."""
    entries: Any = conn.xrange(keys.dead, count=count)
    return [(_order(reply_text(entry_id)), reply_text(entry_id), _decode(fields))
            for entry_id, fields in entries]


def all_ids(conn: redis.Redis, keys: Keys) -> Iterator[str]:
    """Every letter's id up to the newest now, a page at a time.

    Letters that die while we retry (a retried job failing again) wait for
    the next call, so this ends.
    """
    newest: Any = conn.xrevrange(keys.dead, count=1)
    if not newest:
        return
    start, end = "-", reply_text(newest[0][0])
    while True:
        page: Any = conn.xrange(keys.dead, start, end, count=DEAD_PAGE)
        if not page:
            return
        yield from (reply_text(entry_id) for entry_id, _ in page)
        start = "(" + reply_text(page[-1][0])


def retry(conn: redis.Redis, keys: Keys, entry_id: str) -> bool:
    """Move one letter back to the jobs, exactly once even with rival retriers."""
    with conn.pipeline(transaction=True) as pipe:
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


def purge(conn: redis.Redis, keys: Keys) -> int:
    """Delete every letter; how many there were."""
    # XTRIM, not DEL: a key of another type under the prefix is refused, not lost.
    return int(conn.xtrim(keys.dead, maxlen=0, approximate=False))


def _order(entry_id: str) -> tuple[int, int]:
    """An entry id as a sortable pair: (milliseconds, sequence)."""
    ms, _, seq = entry_id.partition("-")
    return (int(ms) if ms.isdigit() else 0, int(seq) if seq.isdigit() else 0)


def _decode(fields: Mapping[bytes, bytes]) -> dict[str, Any]:
    """A dead letter for people: text as str, `data` as its size, error and count parsed."""
    decoded: dict[str, Any] = {}
    for raw_name, value in fields.items():
        name = reply_text(raw_name)
        if name == "data":
            decoded[name] = f"<{len(value)} bytes>"
        elif name == "error":
            decoded[name] = _json_or_text(value)
        elif name == "deliveries" and value.isdigit():
            decoded[name] = int(value)
        else:
            decoded[name] = reply_text(value)
    return decoded


def _json_or_text(value: bytes) -> Any:
    # A dead letter is shown even if its error is not the JSON the contract promises.
    try:
        return json.loads(value)
    except ValueError:
        return reply_text(value)
