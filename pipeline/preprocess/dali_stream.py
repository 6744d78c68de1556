"""DALI batches in flight: fed as they fill, collected in order, overlapping.

`DaliStream` keeps one DALI pipeline per test-time augmentation mode (the
graph of pipeline/preprocess/dali.py), built with `prefetch_queue_depth`
(2 by default) and driven by DALI's scheduled API: a batch is fed to the
external sources and scheduled at once (feed_input, schedule_run), and its
outputs are read later (share_outputs), so that DALI's threads (or the GPU)
decode the next batch while the caller runs the model on the last one. At
most `depth` batches are in flight, all modes together.

The first schedule_run of a new pipeline runs `depth` iterations (DALI's
prefetch): each pipeline is primed with that many batches of one tiny image
when built, so that every later schedule_run runs exactly the batch just fed.

A batch DALI fails on comes back without pixels (its jobs are then retried
one by one by the caller): the pipeline is rebuilt, as DALI may call it no
longer valid, and the batches in flight behind it are fed to the new one.
"""

from __future__ import annotations

import io
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any, Generic, Optional, TypeVar

from nvidia.dali.pipeline import Pipeline
from PIL import Image

from pipeline.items import Pixels
from pipeline.preprocess import DALI_DEFAULT_HINTS, DecoderHints
from pipeline.preprocess.dali import (
    DaliJob,
    build_graph,
    check_reproducible,
    feed,
    outcomes,
    parse_device,
    plan_job,
)
from pipeline.spec import TTA_VIEWS, InputLimits, PreprocessSpec

T = TypeVar("T")
PRIMING_SIDE = 16  # pixels: the tiny image a new pipeline is primed with


@dataclass
class Batch(Generic[T]):
    """Jobs decoded together, each with the caller's item; `alone`: a retry of
    one job whose batch failed."""

    tta: str
    items: list[T] = field(default_factory=list)
    jobs: list[DaliJob] = field(default_factory=list)
    alone: bool = False
    started: float = 0.0  # perf_counter() when scheduled

    def add(self, item: T, job: DaliJob) -> None:
        self.items.append(item)
        self.jobs.append(job)


class DaliStream(Generic[T]):
    """Batches of up to `max_batch_size` views (a TTA mode's images each hold
    several) decoded by DALI, `depth` of them in flight."""

    def __init__(self, spec: PreprocessSpec, device: str, max_batch_size: int,
                 threads: int, hints: DecoderHints = DALI_DEFAULT_HINTS,
                 depth: int = 2, to_torch: Optional[Callable[[object], Any]] = None
                 ) -> None:
        check_reproducible(spec)
        self.to_torch = to_torch  # where the pixels go: see dali.outcomes
        self.spec, self.device, self.threads, self.hints = spec, device, threads, hints
        self.max_batch_size = max_batch_size
        self.depth = depth
        self.on_gpu = device != "cpu"
        # whether plan_job must give each job its window (dali_roi.py)
        self.windowed = hints.decodes_windows(parse_device(device)[0])
        self._pipes: dict[str, Pipeline] = {}
        self._in_flight: deque[Batch[T]] = deque()

    def batch_size(self, tta: str) -> int:
        """Images per DALI batch: as many as one model batch holds."""
        return max(1, self.max_batch_size // TTA_VIEWS[tta])

    @property
    def in_flight(self) -> int:
        return len(self._in_flight)

    def setup(self, tta: str = "none") -> None:
        """Build (and prime) the pipeline of `tta`."""
        pipe = build_graph(self.spec, self.device, tta, self.batch_size(tta), self.threads,
                           self.depth, self.hints)
        priming = _priming_job(self.spec, tta, self.windowed)
        for _ in range(self.depth):
            feed(pipe, [priming], tta)
        pipe.schedule_run()  # the first one runs `depth` iterations
        for _ in range(self.depth):
            pipe.share_outputs()
            pipe.release_outputs()
        self._pipes[tta] = pipe

    def submit(self, batch: Batch[T]) -> None:
        """Feed and schedule a batch; the caller keeps at most `depth` in flight."""
        if batch.tta not in self._pipes:
            self.setup(batch.tta)
        batch.started = time.perf_counter()
        self._schedule(batch)
        self._in_flight.append(batch)

    def collect(self) -> tuple[Batch[T], Optional[list[Optional[Pixels]]]]:
        """The oldest batch in flight and its outcomes (waiting for them): per job
        its uint8 pixels, or None for one pillow must see (dali.outcomes); no
        list at all when DALI failed on the batch."""
        batch = self._in_flight.popleft()
        pipe = self._pipes[batch.tta]
        try:
            pixels, corners = pipe.share_outputs()
            try:
                return batch, outcomes(batch.jobs, pixels, corners, self.on_gpu,
                                       self.to_torch)
            finally:
                pipe.release_outputs()
        except RuntimeError:
            self._rebuild(batch.tta)
            return batch, None

    def close(self) -> None:
        self._in_flight.clear()
        self._pipes.clear()

    def _schedule(self, batch: Batch[T]) -> None:
        pipe = self._pipes[batch.tta]
        feed(pipe, batch.jobs, batch.tta)
        pipe.schedule_run()

    def _rebuild(self, tta: str) -> None:
        """A new pipeline for `tta`; the batches in flight on the old one run on it."""
        del self._pipes[tta]
        self.setup(tta)
        for waiting in self._in_flight:
            if waiting.tta == tta:
                self._schedule(waiting)


def _priming_job(spec: PreprocessSpec, tta: str, windowed: bool) -> DaliJob:
    buffer = io.BytesIO()
    Image.new("RGB", (PRIMING_SIDE, PRIMING_SIDE), (128, 64, 32)).save(buffer, "JPEG")
    job = plan_job(0, buffer.getvalue(), spec, InputLimits(), tta, windowed)
    assert job is not None
    return job
