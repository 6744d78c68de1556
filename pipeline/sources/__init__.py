"""Where jobs come from for `score`: a directory walk, cut into chunks."""

from __future__ import annotations

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
