"""Where jobs come from for `score`: a directory walk, cut into chunks."""

from __future__ import annotations

import queue
from collections.abc import Iterable
from itertools import islice
from typing import Optional, Protocol, runtime_checkable

from pipeline.items import Job


@runtime_checkable
class ChunkSource(Protocol):
    """Jobs in chunks, from a source that may have nothing to give right now."""

    def next_chunk(self, wait_s: float) -> Optional[list[Job]]:
        """Up to one chunk of jobs: [] if none came within `wait_s` (0: do not
        wait at all), None at the end."""


class IterableSource:
    """A finite iterable of jobs (a directory walk), cut into chunks."""

    def __init__(self, jobs: Iterable[Job], chunk_size: int) -> None:
        self.jobs = iter(jobs)
        self.chunk_size = chunk_size

    def next_chunk(self, wait_s: float) -> Optional[list[Job]]:
        return list(islice(self.jobs, self.chunk_size)) or None


class QueueSource:
    """Jobs put on a queue by another thread, cut into chunks; a None ends them."""

    def __init__(self, chunk_size: int) -> None:
        self.jobs: queue.Queue[Optional[Job]] = queue.Queue()
        self.chunk_size = chunk_size
        self.ended = False

    def next_chunk(self, wait_s: float) -> Optional[list[Job]]:
        if self.ended:
            return None
        chunk: list[Job] = []
        try:
            job = self.jobs.get(timeout=wait_s) if wait_s > 0 else self.jobs.get_nowait()
            while True:
                if job is None:
                    self.ended = True
                    return chunk or None
                chunk.append(job)
                if len(chunk) == self.chunk_size:
                    return chunk
                job = self.jobs.get_nowait()
        except queue.Empty:
            return chunk
