"""A job's way in, before any decoding: its file's stat, its bytes, the cache.

Shared by the pool's worker processes (pool.py) and the in-process DALI
producer (in_process.py), so that both read files only from beneath the
allowed roots and under the size limit, fetch URL jobs under the same
policy, and let the cache answer an item before it is read (by the file's
stat) or decoded (by its bytes).
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import TYPE_CHECKING, Optional, Protocol

from pipeline.errors import InputError
from pipeline.items import Job, Prepared
from pipeline.sources.files import read_file
from pipeline.sources.urls import Fetch, UrlFetcher

if TYPE_CHECKING:
    from pipeline.cache.lookup import CacheLookup, Found
    from pipeline.preprocess.pool import WorkerPlan

Stat = Optional[os.stat_result]  # a file's stat before reading, for the cache


class Reader(Protocol):
    """What reads jobs: the plan (limits, allowed roots, URL policy), the cache
    (None: off) and the URL fetcher, made for the first URL job."""

    plan: WorkerPlan
    cache: Optional[CacheLookup]
    fetcher: Optional[UrlFetcher]


def take(reader: Reader, jobs: list[Job]) -> tuple[list[Prepared], list[tuple[Prepared, bytes]]]:
    """One Prepared per job, in order, with what is known before decoding (an error,
    the cache's answer or tensor); and the items still to decode, with their bytes."""
    plan = reader.plan
    prepared = [Prepared(job, error=job.error, tta=job.tta or plan.tta,
                         output=job.output or plan.output) for job in jobs]
    to_read: list[tuple[Prepared, Stat]] = []
    for item in prepared:
        if item.error is None:
            info = stat_for_cache(reader, item.job)
            if not known_unread(reader, item, info):
                to_read.append((item, info))
    to_decode = [(item, data) for item, info, data in read_all(reader, to_read)
                 if not from_cache(reader, item, info, data)]
    return prepared, to_decode


def read_all(reader: Reader, items: list[tuple[Prepared, Stat]]
             ) -> Iterator[tuple[Prepared, Stat, bytes]]:
    """Each item's bytes; an item that cannot be read gets its error instead."""
    # Every URL of the chunk is fetched at once (a few threads), while files are read.
    fetches = {id(item): fetch(reader, item.job.url)
               for item, _ in items if item.job.url is not None}
    for item, info in items:
        if item.job.url is not None:
            try:
                yield item, info, fetches[id(item)].result()
            except InputError as exc:  # never anything else
                item.error = exc
            continue
        if item.job.data is not None:
            yield item, info, item.job.data
            continue
        try:
            yield item, info, read_file(item.job.path, reader.plan.limits.max_file_bytes,
                                        reader.plan.allowed_roots)
        except InputError as exc:
            item.error = exc


def fetch(reader: Reader, url: str) -> Fetch:
    """The download of a URL job, under way; a refusal when URL jobs are off."""
    policy = reader.plan.urls
    if policy is None or not policy.prefixes:
        return Fetch.refused(InputError("url_not_allowed", "URL jobs are disabled here (no "
                                        "serve.allowed_url_prefixes configured)"))
    if reader.fetcher is None:
        reader.fetcher = UrlFetcher(policy)
    return reader.fetcher.submit(url)


def stat_for_cache(reader: Reader, job: Job) -> Stat:
    """The file's stat as seen before reading it; None without a cache or a file."""
    if reader.cache is None or job.data is not None or job.url is not None:
        return None
    try:
        return os.stat(job.path)
    except OSError:
        return None  # reading it will say why


def known_unread(reader: Reader, item: Prepared, info: Stat) -> bool:
    """Fill the item from the cache by the file's stat alone; True on success."""
    if reader.cache is None or info is None:
        return False
    found = reader.cache.find_unread(item.job.path, info, item.tta, item.output)
    return found is not None and fill(item, found)


def from_cache(reader: Reader, item: Prepared, info: Stat, data: bytes) -> bool:
    """Fill the item from the cache by the file's bytes; True when no decoding is needed."""
    if reader.cache is None:
        return False
    found = reader.cache.find(data, item.tta, item.output)
    if info is not None:
        reader.cache.remember_file(item.job.path, info, found.digest)
    return fill(item, found)


def fill(item: Prepared, found: Found) -> bool:
    """Take what the cache found: an answer, a tensor, or a miss (False)."""
    item.digest = found.digest
    if found.predictions is not None:
        item.predictions, item.cache = found.predictions, f"result:{found.tier}"
        item.embedding = found.embedding
        return True
    if found.pixels is not None:
        item.pixels, item.cache = found.pixels, f"tensor:{found.tier}"
        return True
    item.cache = "miss"
    return False
