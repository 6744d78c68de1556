"""Sharded queues: which shard a job goes to, and what each shard's keys are named.

A shard is one jobs stream with its results, dead letters and reply streams,
all under one hash-tagged prefix, `<prefix>:{N}`, so that Redis Cluster keeps
a shard's keys in one hash slot: it refuses a MULTI across slots, and the
daemon writes a result and acknowledges its job in one MULTI. Shards may live
on one Redis or on several (`redis.shard_urls`). With one shard the keys keep
the plain prefix (`<prefix>:jobs`), as before shards existed.

Jobs are spread by a stable hash of the job id, CRC-32 (the same in every
process, host and language, unlike Python's salted `hash()`), so a job
submitted again under its id lands on the same shard.
"""

from __future__ import annotations

import zlib
from typing import Optional


def shard_of(job_id: str, count: int) -> int:
    """The shard (0 to count - 1) of the job with id `job_id`."""
    if count < 1:
        raise ValueError(f"a deployment has at least one shard, not {count}")
    return zlib.crc32(job_id.encode("utf-8", "surrogatepass")) % count


def shard_prefix(prefix: str, index: int, count: int) -> str:
    """The key prefix of shard `index` of `count`: `prefix` itself for one shard."""
    if not 0 <= index < count:
        raise ValueError(f"shard {index} does not exist: there are {count} (0 to {count - 1})")
    return prefix if count == 1 else f"{prefix}:{{{index}}}"


def hash_tag(key: str) -> Optional[str]:
    """The part of `key` Redis Cluster hashes instead of the whole key: what lies
    between the first `{` and the next `}`, when that is not empty (the cluster
    specification's rule); None when the whole key is hashed."""
    start = key.find("{")
    if start < 0:
        return None
    end = key.find("}", start + 1)
    if end <= start + 1:
        return None
    return key[start + 1:end]


def stream_in_shard(name: str, prefix: str, shard: str) -> str:
    """Stream `name` as shard prefix `shard` holds it.

    A name under the deployment's `prefix` without a hash tag (the default
    result stream, a `Client.reply_stream`) stands for one stream per shard:
    `imgpipe:results:ab12` is `imgpipe:{1}:results:ab12` in shard 1, in that
    shard's hash slot and on its server. Any other name is the caller's own
    and stays as it is.
    """
    if shard == prefix or hash_tag(name) is not None or not name.startswith(prefix + ":"):
        return name
    return shard + name[len(prefix):]
