"""DALI in the inference process: model-sized batches, no pickling, overlapped.

`InProcessDali` takes the place of the preprocessing pool for the dali
backend (preprocess.dali_in_process): it reads jobs in the engine's feeder
thread exactly as the pool's workers do (pipeline/preprocess/intake.py: the
allowed roots, the size limit, the cache first, so that an item the cache
answers is never decoded), and decodes the rest with DALI in batches of
`batching.max_batch_size` views, two in flight (dali_stream.py), so that
DALI decodes the next batch while the model runs on the current one. Its
pixels go to the engine's bounded queue without crossing a process: on
the model's GPU as rows of one torch tensor per batch, never through the
host (preprocess.dali_output, dali_torch.py), else as NumPy arrays.

Files DALI does not decode like Pillow (dali.plan_job says which, from the
header), a JPEG whose last pixel says it may be incomplete, and any file
DALI fails on when retried alone go to a pool of Pillow worker processes
(PreprocessPool, backend pillow, without a cache of its own) on the cores
DALI leaves. At most `max_outstanding` jobs are taken from the source and
not yet handed on, whatever the mix: memory stays bounded.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import Counter, deque
from collections.abc import Callable, Iterator
from dataclasses import replace
from typing import TYPE_CHECKING, Any, Optional

import numpy as np

from pipeline.errors import InputError
from pipeline.items import Job, Pixels, Prepared
from pipeline.preprocess import intake
from pipeline.preprocess.dali import plan_job
from pipeline.preprocess.dali_stream import Batch, DaliStream
from pipeline.preprocess.pool import PreprocessPool, TierCounters, WorkerPlan
from pipeline.sources import ChunkSource, QueueSource
from pipeline.sources.urls import UrlFetcher

if TYPE_CHECKING:
    from pipeline.cache.lookup import CacheLookup

IDLE_WAIT_S = 1.0  # how long the source may block while nothing is under way
POLL_S = 0.005  # how long to wait for Pillow's results while nothing else is due
DEPTH = 2  # DALI batches in flight


def pillow_share(threads: int) -> int:
    """Pillow worker processes beside `threads` DALI threads: a quarter, at least one."""
    return max(1, threads // 4)


class InProcessDali:
    """The engine's producer for DALI in the inference process: map_chunks()
    yields one Prepared per job, in completion order (as PreprocessPool)."""

    def __init__(self, plan: WorkerPlan, max_batch_size: int, chunk_size: int = 8,
                 handoff: str = "auto", output: str = "auto") -> None:
        self.plan = plan
        self.chunk_size = chunk_size
        pillow_workers = pillow_share(plan.threads)
        self.stream: DaliStream[Prepared] = DaliStream(
            plan.spec, plan.device, max_batch_size, max(1, plan.threads - pillow_workers),
            plan.hints, DEPTH, _to_torch(output, plan.device))
        self.pillow = PreprocessPool(replace(plan, backend="pillow", device="cpu", threads=1,
                                             cache=None), pillow_workers, chunk_size, handoff)
        # taken from the source, not yet handed on: the batches in flight, the one
        # filling, and a chunk
        self.max_outstanding = (DEPTH + 1) * max_batch_size + chunk_size
        self.cache: Optional[CacheLookup] = None
        self.fetcher: Optional[UrlFetcher] = None  # intake.Reader's, made when first needed
        self.cache_counters: TierCounters = {}
        self.decode_fallbacks = 0
        self.outstanding = 0
        self._filling: dict[str, Batch[Prepared]] = {}  # per TTA mode
        self._ready: deque[Batch[Prepared]] = deque()  # full, not yet scheduled
        self._lane: Optional[_PillowLane] = None

    def launch(self) -> None:
        """Spawn the Pillow workers, open the cache and build DALI's pipeline."""
        self.pillow.launch()
        if self.plan.cache is not None and self.plan.cache.enabled:
            from pipeline.cache.lookup import CacheLookup

            self.cache = CacheLookup(self.plan.cache, self.plan.spec.digest(),
                                     self.plan.result_scope)
            self.cache.setup()
        self.stream.setup(self.plan.tta)

    def wait_started(self) -> None:
        self.pillow.wait_started()

    def map_chunks(self, source: ChunkSource) -> Iterator[Prepared]:
        """One Prepared per job of `source`, never more than max_outstanding taken."""
        self.cache_counters, self.outstanding = {}, 0
        self._lane = lane = _PillowLane(self.pillow)
        lane.start()
        try:
            yield from self._run(source)
        finally:
            lane.stop()
            self._lane = None
            self._filling.clear()
            self._ready.clear()
            if self.stream.in_flight:  # an interrupted run: its batches are dropped
                self.stream.close()
            self._count_cache()

    def close(self) -> None:
        self.pillow.close()
        self.stream.close()
        if self.cache is not None:
            self.cache.close()
            self.cache = None

    def _run(self, source: ChunkSource) -> Iterator[Prepared]:
        exhausted = False
        while True:
            nothing_now = exhausted
            while not exhausted and self.outstanding < self.max_outstanding:
                chunk = source.next_chunk(0 if self.outstanding else IDLE_WAIT_S)
                if chunk is None:
                    exhausted = nothing_now = True
                elif not chunk:
                    nothing_now = True
                    break
                else:
                    self.outstanding += len(chunk)
                    yield from self._hand_on(self._take(chunk))
            # A partial batch waits for more only while more may come at once.
            yield from self._hand_on(self._submit(
                flush=nothing_now or self.outstanding >= self.max_outstanding))
            yield from self._hand_on(self._pillow_done())
            if self.stream.in_flight:
                if self.stream.in_flight >= DEPTH or nothing_now or not self._filling:
                    yield from self._hand_on(self._collect())
            elif exhausted and self.outstanding == 0:
                return
            elif self.outstanding:
                yield from self._hand_on(self._pillow_done(POLL_S))

    def _hand_on(self, items: Iterator[Prepared]) -> Iterator[Prepared]:
        for item in items:
            self.outstanding -= 1
            yield item

    def _take(self, jobs: list[Job]) -> Iterator[Prepared]:
        """Read and look up a chunk; what is done already (an error, a cached
        answer) comes out at once, the rest waits for a decoder."""
        started = time.perf_counter()
        prepared, to_decode = intake.take(self, jobs)
        lookup_ms = (time.perf_counter() - started) * 1000 / len(jobs)
        for item in prepared:
            item.timings_ms["cache_lookup"] = lookup_ms
        waiting = {id(item) for item, _ in to_decode}
        yield from (item for item in prepared if id(item) not in waiting)
        for item, data in to_decode:
            yield from self._route(item, data)

    def _route(self, item: Prepared, data: bytes) -> Iterator[Prepared]:
        """To DALI's filling batch, to Pillow, or out at once with its error."""
        try:
            job = plan_job(0, data, self.plan.spec, self.plan.limits, item.tta,
                           self.stream.windowed)
        except InputError as exc:
            item.error = exc
            yield item
            return
        except Exception:  # a header the parse trips on: Pillow's worker names the error
            job = None
        if job is None:
            self._to_pillow(item, data)
        else:
            batch = self._filling.setdefault(item.tta, Batch(item.tta))
            batch.add(item, job)
            if len(batch.jobs) == self.stream.batch_size(item.tta):
                self._ready.append(self._filling.pop(item.tta))

    def _submit(self, flush: bool) -> Iterator[Prepared]:
        """Schedule the full batches (and with `flush`, the partial ones) while
        fewer than DEPTH are in flight; collect the oldest to make room."""
        if flush:
            self._ready.extend(self._filling.values())
            self._filling.clear()
        while self._ready:
            while self.stream.in_flight >= DEPTH:
                yield from self._collect()
            self.stream.submit(self._ready.popleft())

    def _collect(self) -> Iterator[Prepared]:
        batch, outcomes = self.stream.collect()
        if outcomes is None:
            yield from self._failed(batch)
            return
        decode_ms = (time.perf_counter() - batch.started) * 1000 / len(batch.items)
        decoded: list[tuple[Prepared, Pixels]] = []
        for item, job, pixels in zip(batch.items, batch.jobs, outcomes, strict=True):
            if pixels is None:  # may be incomplete: Pillow tells (dali.py)
                self._to_pillow(item, job.data)
            else:
                decoded.append((item, pixels))
        self._store_tensors(decoded)
        for item, pixels in decoded:
            self._decoded(item, pixels, decode_ms)
            yield item

    def _store_tensors(self, decoded: list[tuple[Prepared, Pixels]]) -> None:
        """Keep a batch's tensors in the cache: from the device in one copy."""
        kept = [(item, pixels) for item, pixels in decoded if item.digest is not None]
        if self.cache is None or not kept:
            return
        rows = [pixels for _, pixels in kept]
        on_host = [row for row in rows if isinstance(row, np.ndarray)]
        if len(on_host) < len(rows):
            on_host = _stacked_on_host(rows)
        for (item, _), pixels in zip(kept, on_host, strict=True):
            assert item.digest is not None
            self.cache.store_tensor(item.digest, pixels, item.tta)

    def _failed(self, batch: Batch[Prepared]) -> Iterator[Prepared]:
        """A batch DALI failed on: each of its jobs again alone; one failing alone
        goes to Pillow, which names its error."""
        if batch.alone:
            self._to_pillow(batch.items[0], batch.jobs[0].data)
            return
        for item, job in zip(batch.items, batch.jobs, strict=True):
            single: Batch[Prepared] = Batch(batch.tta, alone=True)
            single.add(item, job)
            while self.stream.in_flight >= DEPTH:
                yield from self._collect()
            self.stream.submit(single)

    def _to_pillow(self, item: Prepared, data: bytes) -> None:
        assert self._lane is not None
        self.decode_fallbacks += 1
        self._lane.put(item, data)

    def _pillow_done(self, wait_s: float = 0) -> Iterator[Prepared]:
        assert self._lane is not None
        for item, done in self._lane.done(wait_s):
            if done.error is not None or done.pixels is None:
                item.error = done.error
            else:
                self._store_tensors([(item, done.pixels)])
                self._decoded(item, done.pixels, done.timings_ms.get("decode", 0.0))
            yield item

    def _decoded(self, item: Prepared, pixels: Pixels, decode_ms: float) -> None:
        item.pixels = pixels
        item.timings_ms["decode"] = decode_ms
        item.timings_ms["preprocess"] = item.timings_ms.get("cache_lookup", 0.0) + decode_ms

    def _count_cache(self) -> None:
        if self.cache is None:
            return
        for tier, delta in self.cache.counters_since_last_call().items():
            self.cache_counters.setdefault(tier, Counter()).update(delta)


def _to_torch(output: str, device: str) -> Optional[Callable[[object], Any]]:
    """Where DALI's batches go (preprocess.dali_output): "device" copies them into
    torch tensors on DALI's device, the model's (dali_torch.py); "host" into
    NumPy arrays; "auto" is "device" on a GPU and "host" on the CPU."""
    if output == "host" or output == "auto" and device == "cpu":
        return None
    from pipeline.preprocess.dali_torch import TorchOutput  # imports torch

    return TorchOutput(device).copy


def _stacked_on_host(rows: list[Pixels]) -> list[np.ndarray]:
    """Tensors' rows copied to the host together: one copy, not one per row."""
    import torch

    return list(torch.stack([torch.as_tensor(row) for row in rows]).numpy(force=True))


class _PillowLane:
    """The Pillow pool's map_chunks in a thread of its own: items in by put(),
    their Pillow results out by done(), matched by a token in Job.ref."""

    def __init__(self, pool: PreprocessPool) -> None:
        self.pool = pool
        self._source = QueueSource(pool.chunk_size)
        self._results: queue.Queue[Prepared] = queue.Queue()
        self._waiting: dict[str, Prepared] = {}
        self._tokens = 0
        self._thread = threading.Thread(target=self._run, name="imgpipe-pillow-lane",
                                        daemon=True)
        self.error: Optional[BaseException] = None

    def start(self) -> None:
        self._thread.start()

    def put(self, item: Prepared, data: bytes) -> None:
        self._tokens += 1
        token = str(self._tokens)
        self._waiting[token] = item
        self._source.jobs.put(Job(item.job.path, data=data, ref=token, tta=item.tta,
                                  output=item.output))

    def done(self, wait_s: float = 0) -> Iterator[tuple[Prepared, Prepared]]:
        """(the item put, Pillow's Prepared for it) for each one finished."""
        if self.error is not None:
            raise self.error
        try:
            result = self._results.get(timeout=wait_s) if wait_s else \
                self._results.get_nowait()
        except queue.Empty:
            return
        while True:
            yield self._waiting.pop(result.job.ref or ""), result
            try:
                result = self._results.get_nowait()
            except queue.Empty:
                return

    def stop(self) -> None:
        self._source.jobs.put(None)
        self._thread.join()

    def _run(self) -> None:
        try:
            for result in self.pool.map_chunks(self._source):
                self._results.put(result)
        except BaseException as exc:  # raised in the producer's thread by done()
            self.error = exc

