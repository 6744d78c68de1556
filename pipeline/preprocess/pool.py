"""A pool of preprocessing processes with a bounded window of work in flight.

Workers read files, consult the cache, and decode what it does not know with
one preprocessing backend each. They never import torch, ignore SIGINT (the
parent decides how to stop), and return uint8 arrays. At most
`max_chunks_in_flight` chunks are outstanding, so a huge directory never turns
into a huge backlog of futures. Their pixels come back through shared-memory
slots (`shared_slots.py`, `preprocess.handoff`) or pickled with the rest.
"""

from __future__ import annotations

import contextlib
import logging
import multiprocessing
import os
import signal
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import FIRST_COMPLETED, Future, ProcessPoolExecutor, wait
from concurrent.futures.process import BrokenProcessPool
from dataclasses import dataclass, replace
from functools import partial
from logging.handlers import QueueListener
from typing import TYPE_CHECKING, Any, Optional

from pipeline import logs
from pipeline.config import CacheSettings
from pipeline.errors import InputError, PermanentError, internal_error
from pipeline.items import Job, Prepared
from pipeline.preprocess import (
    DALI_DEFAULT_HINTS,
    DecoderHints,
    Outcome,
    PreprocessBackend,
    intake,
)
from pipeline.preprocess.select import create_backend
from pipeline.preprocess.shared_slots import (
    Placed,
    SlotLayout,
    SlotRing,
    SlotWriter,
    resolve_handoff,
    slot_bytes,
)
from pipeline.sources import ChunkSource, IterableSource
from pipeline.sources.urls import UrlFetcher, UrlPolicy
from pipeline.spec import InputLimits, PreprocessSpec

if TYPE_CHECKING:
    from pipeline.cache.lookup import CacheLookup, ResultScope


@dataclass(frozen=True)
class WorkerPlan:
    """Everything a worker process needs to build its backend and cache."""

    backend: str
    spec: PreprocessSpec
    limits: InputLimits
    device: str = "cpu"
    threads: int = 1
    cache: Optional[CacheSettings] = None
    result_scope: Optional[ResultScope] = None
    allowed_roots: Optional[tuple[str, ...]] = None  # files only from beneath these
    urls: Optional[UrlPolicy] = None  # what URL jobs may fetch; None: none
    tta: str = "none"  # the TTA mode of jobs that name none (Job.tta)
    output: str = "logits"  # the output kind of jobs that name none (Job.output)
    slots: Optional[SlotLayout] = None  # the pool's shared-memory slots, if it has any
    hints: DecoderHints = DALI_DEFAULT_HINTS  # for DALI's GPU decoder


@dataclass
class _Worker:
    plan: WorkerPlan
    backend: PreprocessBackend
    cache: Optional[CacheLookup]
    fetcher: Optional[UrlFetcher] = None  # made for the first URL job
    slots: Optional[SlotWriter] = None


log = logging.getLogger("imgpipe.preprocess")
_worker: Optional[_Worker] = None
LOG_QUEUE_RECORDS = 1000
PARENT_CHECK_S = 1.0
POLL_S = 0.005  # how often a source is polled while chunks are in flight
IDLE_WAIT_S = 1.0  # how long it may block while none are
START_ATTEMPTS = 3
START_BACKOFF_S = 0.5  # doubled after each failed start
RESTART_JOIN_S = 5.0  # how long a restart waits for the broken pool's workers to go


def _init_worker(plan: WorkerPlan, log_queue: Any) -> None:
    global _worker
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    # Blocked by the parent while it spawned us (see _sigint_blocked); ignored now.
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
    _exit_with_parent()
    logs.send_to(log_queue)
    backend = create_backend(plan.backend, plan.spec, plan.limits, plan.device, plan.threads,
                             plan.hints)
    backend.setup()
    cache = None
    if plan.cache is not None and plan.cache.enabled:
        from pipeline.cache.lookup import CacheLookup  # the cache's libraries only when used

        cache = CacheLookup(plan.cache, plan.spec.digest(), plan.result_scope)
        cache.setup()
    _worker = _Worker(plan, backend, cache,
                      slots=SlotWriter(plan.slots) if plan.slots is not None else None)


def _exit_with_parent() -> None:
    """Leave when the parent dies (even by SIGKILL): an idle worker would wait forever."""
    parent = os.getppid()

    def watch() -> None:
        while os.getppid() == parent:
            time.sleep(PARENT_CHECK_S)
        os._exit(1)

    threading.Thread(target=watch, name="imgpipe-parent-watch", daemon=True).start()


def _ready() -> bool:
    return _worker is not None


TierCounters = dict[str, Counter[str]]
# items, cache counters, fallbacks, and which items' pixels wait in which slots
ChunkOutcome = tuple[list[Prepared], TierCounters, int, list[Placed]]
ChunkFuture = Future[ChunkOutcome]


def preprocess_chunk(jobs: list[Job], slots: Sequence[int] = ()) -> ChunkOutcome:
    """Read and preprocess a chunk of jobs: one Prepared per job, in order, how
    this worker's cache tiers' counters moved meanwhile, how many images its
    decoder handed to its fallback (DALI to Pillow), and which items' pixels
    it moved into the shared-memory `slots` lent to the chunk."""
    assert _worker is not None, "worker not initialised"
    started = time.perf_counter()
    prepared, to_decode = intake.take(_worker, jobs)
    decoding = time.perf_counter()
    fallbacks_before = _worker.backend.fallbacks
    outcomes = _decode(to_decode)
    decode_ms = (time.perf_counter() - decoding) * 1000 / max(len(to_decode), 1)
    lookup_ms = (decoding - started) * 1000 / max(len(jobs), 1)
    for (item, _), outcome in zip(to_decode, outcomes, strict=True):
        if isinstance(outcome, InputError):
            item.error = outcome
        else:
            item.pixels = outcome
            if _worker.cache is not None and item.digest is not None:
                _worker.cache.store_tensor(item.digest, outcome, item.tta)
    per_item_ms = (time.perf_counter() - started) * 1000 / max(len(jobs), 1)
    for item in prepared:
        # Before decoding: stat, read, cache lookups. preprocess: the whole of it.
        item.timings_ms["cache_lookup"] = lookup_ms
        item.timings_ms["preprocess"] = per_item_ms
    for item, _ in to_decode:
        item.timings_ms["decode"] = decode_ms
    counters = _worker.cache.counters_since_last_call() if _worker.cache is not None else {}
    placed = _worker.slots.place(prepared, slots) if _worker.slots is not None else []
    return prepared, counters, _worker.backend.fallbacks - fallbacks_before, placed


def _decode(items: list[tuple[Prepared, bytes]]) -> list[Outcome]:
    """The backend's outcome for each item, in order: one call per TTA mode, each
    image decoded once and its views cut from that."""
    assert _worker is not None
    outcomes: list[Optional[Outcome]] = [None] * len(items)
    modes: dict[str, list[int]] = {}
    for index, (item, _) in enumerate(items):
        modes.setdefault(item.tta, []).append(index)
    for mode, indices in modes.items():
        for index, outcome in zip(indices, _worker.backend.run(
                [items[index][1] for index in indices], mode), strict=True):
            outcomes[index] = outcome
    return outcomes  # type: ignore[return-value]


class PreprocessPool:
    """Preprocess jobs in `workers` processes; results in completion order."""

    initializer: Callable[[WorkerPlan, Any], None] = staticmethod(_init_worker)

    def __init__(self, plan: WorkerPlan, workers: int, chunk_size: int = 8,
                 handoff: str = "auto") -> None:
        self.plan = plan
        self.workers = workers
        self.chunk_size = chunk_size
        self.max_chunks_in_flight = workers * 2
        # One slot per job the window holds, each an item of the run's shape.
        window, size = self.max_chunks_in_flight * chunk_size, slot_bytes(plan.spec, plan.tta)
        self.handoff = resolve_handoff(handoff, window * size)
        self.slots = SlotRing(window if self.handoff == "shared_memory" else 0, size)
        self.executor: Optional[ProcessPoolExecutor] = None
        self.generation = 0  # bumped on every restart after a crash
        self.cache_counters: TierCounters = {}  # summed over every worker, per map()
        self.decode_fallbacks = 0  # summed over every worker, for good
        self.outstanding = 0  # jobs submitted whose Prepared has not been handed out yet
        self.context = multiprocessing.get_context("spawn")
        self.log_queue = self.context.Queue(LOG_QUEUE_RECORDS)
        self.log_listener: Optional[QueueListener] = None
        self._readies: Optional[list[Future[bool]]] = None  # launched, not yet waited on

    def start(self) -> None:
        """Start every worker and wait until each has built its backend."""
        self.launch()
        self.wait_started()

    def launch(self) -> None:
        """Spawn the workers and return at once, so that the caller can load its
        model while they start; wait_started() waits for them."""
        if self.log_listener is None:
            self.log_listener = logs.forward_from(self.log_queue)
        self.slots.open()
        self._readies = self._spawn()

    def wait_started(self) -> None:
        """Wait until every worker has built its backend. A start that fails (a
        worker killed, or crashing) is retried with backoff."""
        for attempt in range(1, START_ATTEMPTS + 1):
            try:
                if self._readies is None:
                    raise BrokenProcessPool("a worker died as it was spawned")
                for ready in self._readies:
                    ready.result()
                return
            except BrokenProcessPool as exc:
                cause = self._failed_start()
                if attempt == START_ATTEMPTS:
                    self.close()
                    raise PermanentError(f"the preprocessing workers failed to start "
                                         f"{START_ATTEMPTS} times; the last time {cause}") \
                        from exc
                backoff = START_BACKOFF_S * 2 ** (attempt - 1)
                log.warning("the preprocessing workers failed to start: %s; retrying in "
                            "%g s", cause, backoff)
                time.sleep(backoff)
                self._readies = self._spawn()

    def _spawn(self) -> Optional[list[Future[bool]]]:
        """A new executor and one readiness check per worker; None if it broke at once."""
        # spawn: workers must not inherit torch's threads or a CUDA context.
        self.executor = ProcessPoolExecutor(
            self.workers, mp_context=self.context,
            initializer=self.initializer,
            initargs=(replace(self.plan, slots=self.slots.layout), self.log_queue))
        try:
            with _sigint_blocked():  # the workers are spawned on submit
                return [self.executor.submit(_ready) for _ in range(self.workers)]
        except BrokenProcessPool:
            return None

    def _failed_start(self) -> str:
        """Shut the broken executor down; why its workers died, in words."""
        assert self.executor is not None
        # The executor forgets its processes on shutdown; their exit codes are
        # known once it has joined them.
        processes = list((getattr(self.executor, "_processes", None) or {}).values())
        self.executor.shutdown(wait=True, cancel_futures=True)
        self.executor = None
        causes = sorted({_exit_cause(process.exitcode) for process in processes
                         if process.exitcode not in (None, 0, -signal.SIGTERM)})
        return ", ".join(causes) or "a worker exited while starting (its error is printed " \
            "above)"

    def map(self, jobs: Iterable[Job]) -> Iterator[Prepared]:
        """Yield one Prepared per job, in completion order."""
        return self.map_chunks(IterableSource(jobs, self.chunk_size))

    def map_chunks(self, source: ChunkSource) -> Iterator[Prepared]:
        """Yield one Prepared per job of `source`; never more than the window in flight.

        While chunks are in flight the source is polled without waiting and
        the pool waits on the chunks instead, so a source with nothing new
        never delays collecting them.
        """
        self.cache_counters, self.outstanding = {}, 0
        in_flight: dict[ChunkFuture, tuple[list[Job], int, list[int]]] = {}
        exhausted = False
        try:
            while in_flight or not exhausted:
                while not exhausted and len(in_flight) < self.max_chunks_in_flight:
                    chunk = source.next_chunk(0 if in_flight else IDLE_WAIT_S)
                    if chunk is None:
                        exhausted = True
                    elif not chunk:
                        break
                    else:
                        slots = self.slots.take(len(chunk))
                        in_flight[self._submit(chunk, slots)] = (chunk, self.generation, slots)
                        self.outstanding += len(chunk)
                if in_flight:
                    window_open = not exhausted and len(in_flight) < self.max_chunks_in_flight
                    done, _ = wait(in_flight, timeout=POLL_S if window_open else None,
                                   return_when=FIRST_COMPLETED)
                    for future in done:
                        for item in self._collect(future, *in_flight.pop(future)):
                            self.outstanding -= 1
                            yield item
        finally:  # left early: a chunk's slots are free once no worker writes in them
            for future, (_, _, slots) in in_flight.items():
                future.add_done_callback(partial(self._free_slots, slots))

    def _submit(self, chunk: list[Job], slots: Sequence[int] = ()) -> ChunkFuture:
        assert self.executor is not None, "call start() first"
        try:
            return self.executor.submit(preprocess_chunk, chunk, slots)
        except BrokenProcessPool:
            self._restart()
            return self.executor.submit(preprocess_chunk, chunk, slots)

    def _free_slots(self, slots: list[int], _: object = None) -> None:
        self.slots.free(slots)

    def _collect(self, future: ChunkFuture, chunk: list[Job], generation: int,
                 slots: list[int]) -> list[Prepared]:
        try:
            prepared, counters, fallbacks, placed = future.result()
            self.slots.copy_out(prepared, placed)
        except BrokenProcessPool:
            # A process died (a decoder crash, the OOM killer): the chunks it took
            # down run again one job at a time, so only a culprit fails.
            if generation == self.generation:
                self._restart()
            return [self._alone(job) for job in chunk]
        except Exception:  # a bug met by some input: again one job at a time, likewise
            log.exception("preprocessing a chunk of %d failed; retrying its jobs one by one",
                          len(chunk))
            return [self._alone(job) for job in chunk]
        finally:
            self.slots.free(slots)
        self._count(counters, fallbacks)
        return prepared

    def _alone(self, job: Job) -> Prepared:
        generation = self.generation
        try:
            prepared, counters, fallbacks, _ = self._submit([job]).result()  # pickled
        except BrokenProcessPool:
            if generation == self.generation:
                self._restart()
            return Prepared(job, error=InputError(
                "worker_crashed", "the preprocessing worker crashed on this image"))
        except Exception as exc:
            log.exception("preprocessing %s failed", job.path)
            return Prepared(job, error=internal_error(exc))
        self._count(counters, fallbacks)
        return prepared[0]

    def _count(self, counters: TierCounters, fallbacks: int) -> None:
        self.decode_fallbacks += fallbacks
        for tier, delta in counters.items():
            self.cache_counters.setdefault(tier, Counter()).update(delta)

    def _restart(self) -> None:
        if self.executor is not None:
            dying = list((getattr(self.executor, "_processes", None) or {}).values())
            self.executor.shutdown(wait=False, cancel_futures=True)
            for process in dying:  # none may write into a slot that is lent again
                process.join(RESTART_JOIN_S)
        self.generation += 1
        self.start()

    def close(self) -> None:
        if self.executor is not None:
            self.executor.shutdown(wait=True, cancel_futures=True)
            self.executor = None
        self.slots.close()
        if self.log_listener is not None:
            self.log_listener.stop()  # after the workers: their last records are printed
            self.log_listener = None


def _exit_cause(exitcode: int) -> str:
    if exitcode < 0:
        return f"a worker was killed by {signal.Signals(-exitcode).name}"
    return f"a worker exited with status {exitcode} (its error is printed above)"


@contextlib.contextmanager
def _sigint_blocked() -> Iterator[None]:
    """SIGINT blocked in this thread, so processes spawned meanwhile start with it
    blocked: a Ctrl-C while they import would print a traceback in each of them.
    The parent still gets it (another thread takes it, or it waits until unblocked)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT})
    try:
        yield
    finally:
        signal.pthread_sigmask(signal.SIG_UNBLOCK, {signal.SIGINT})
