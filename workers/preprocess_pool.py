"""A pool of preprocessing processes with a bounded window of work in flight.

Workers read files and decode them with one preprocessing backend each. They
never import torch, ignore SIGINT (the parent decides how to stop), and
return uint8 arrays. At most `max_chunks_in_flight` chunks are outstanding, so
a huge directory never turns into a huge backlog of futures.
"""

from __future__ import annotations

import multiprocessing
import signal
import time
from collections.abc import Iterable, Iterator
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from itertools import islice
from typing import Optional

from pipeline.errors import InputError
from pipeline.items import Job, Prepared
from pipeline.preprocess import PreprocessBackend, create_backend
from pipeline.sources.files import read_file
from pipeline.spec import InputLimits, PreprocessSpec

_backend: Optional[PreprocessBackend] = None
_limits = InputLimits()


def _init_worker(backend: str, spec: PreprocessSpec, limits: InputLimits, device: str,
                 threads: int) -> None:
    global _backend, _limits
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    _limits = limits
    _backend = create_backend(backend, spec, limits, device, threads)
    _backend.setup()


def preprocess_chunk(jobs: list[Job]) -> list[Prepared]:
    """Read and preprocess a chunk of jobs; one Prepared per job, in order."""
    assert _backend is not None, "worker not initialised"
    started = time.perf_counter()
    prepared = [Prepared(job, error=job.error) for job in jobs]
    readable: list[Prepared] = []
    payloads: list[bytes] = []
    for item in prepared:
        if item.error is None:
            try:
                payloads.append(read_file(item.job.path, _limits.max_file_bytes))
                readable.append(item)
            except InputError as exc:
                item.error = exc
    for item, outcome in zip(readable, _backend.run(payloads), strict=True):
        if isinstance(outcome, InputError):
            item.error = outcome
        else:
            item.pixels = outcome
    per_item_ms = (time.perf_counter() - started) * 1000 / max(len(jobs), 1)
    for item in prepared:
        item.timings_ms["preprocess"] = per_item_ms
    return prepared


class PreprocessPool:
    """Preprocess jobs in `workers` processes; results in completion order."""

    def __init__(self, backend: str, spec: PreprocessSpec, limits: InputLimits,
                 workers: int, chunk_size: int = 8, device: str = "cpu",
                 threads_per_worker: int = 1) -> None:
        self.init_args = (backend, spec, limits, device, threads_per_worker)
        self.workers = workers
        self.chunk_size = chunk_size
        self.max_chunks_in_flight = workers * 2
        self.executor: Optional[ProcessPoolExecutor] = None
        self.generation = 0  # bumped on every restart after a crash

    def start(self) -> None:
        # spawn: workers must not inherit torch's threads or a CUDA context.
        self.executor = ProcessPoolExecutor(
            self.workers, mp_context=multiprocessing.get_context("spawn"),
            initializer=_init_worker, initargs=self.init_args)

    def map(self, jobs: Iterable[Job]) -> Iterator[Prepared]:
        """Yield one Prepared per job; never more than the window in flight."""
        chunks = _chunked(iter(jobs), self.chunk_size)
        in_flight: dict[Future[list[Prepared]], tuple[list[Job], int]] = {}
        exhausted = False
        while in_flight or not exhausted:
            while not exhausted and len(in_flight) < self.max_chunks_in_flight:
                chunk = next(chunks, None)
                if chunk is None:
                    exhausted = True
                else:
                    future = self._submit(chunk)
                    in_flight[future] = (chunk, self.generation)
            if in_flight:
                done, _ = wait(in_flight, return_when=FIRST_COMPLETED)
                for future in done:
                    yield from self._collect(future, *in_flight.pop(future))

    def _submit(self, chunk: list[Job]) -> Future[list[Prepared]]:
        assert self.executor is not None, "call start() first"
        try:
            return self.executor.submit(preprocess_chunk, chunk)
        except BrokenProcessPool:
            self._restart()
            return self.executor.submit(preprocess_chunk, chunk)

    def _collect(self, future: Future[list[Prepared]], chunk: list[Job],
                 generation: int) -> list[Prepared]:
        try:
            return future.result()
        except BrokenProcessPool:
            # A decoder crashed a process: fail the chunks it took down, keep going.
            if generation == self.generation:
                self._restart()
            crash = InputError("worker_crashed", "the preprocessing worker crashed on this chunk")
            return [Prepared(job, error=crash) for job in chunk]

    def _restart(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=False, cancel_futures=True)
        self.generation += 1
        self.start()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None


def _chunked(jobs: Iterator[Job], size: int) -> Iterator[list[Job]]:
    while chunk := list(islice(jobs, size)):
        yield chunk
