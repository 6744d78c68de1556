"""imgpipe's Prometheus metrics, in a registry of their own.

A private `CollectorRegistry` (not prometheus_client's global one) lets tests
and several engines in one process each have their own, and keeps the
process-level collectors of the default registry out of the exposition.

Every series a dashboard relies on is created at zero up front (each job
status, each stage), so `rate()` works from the first scrape.

    jobs_total{status}     ok | error | expired; one per job, a partition
    errors_total{code}     every non-ok job by its stable code (expired included)
    stage_seconds{stage}   queue_wait, cache_lookup, decode, h2d, inference, publish
    cache_hits_total{tier,kind}, cache_misses_total
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Mapping
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram, Info
from prometheus_client.context_managers import Timer

from pipeline.transport.contract import EXPIRED

NAMESPACE = "imgpipe"
STAGES = ("queue_wait", "cache_lookup", "decode", "h2d", "inference", "publish")
STATUSES = ("ok", "error", "expired")
# 0.5 ms (a cache hit) to 10 s (a cold batch on a busy CPU), ~2.5x apart.
STAGE_BUCKETS_S = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5,
                   1.0, 2.5, 5.0, 10.0)
BATCH_BUCKETS = tuple(float(2**i) for i in range(11))  # 1, 2, 4, ... 1024
# Record `timings_ms` keys -> stage label. Unknown keys are ignored rather than
# becoming new label values (unbounded label sets are what breaks Prometheus).
# "preprocess" (a job's whole time in a worker) is cache_lookup + decode, not a stage.
TIMING_STAGES = {stage: stage for stage in STAGES}


class Metrics:
    """The metrics of one engine/daemon; every method is thread-safe."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        self._counters()
        self._histograms()
        self._gauges()
        self._zero_series()

    def _counters(self) -> None:
        self.jobs = self._counter("jobs_total", "Jobs finished, by outcome.", ["status"])
        self.errors = self._counter("errors_total", "Jobs not scored, by error code.", ["code"])
        self.cache_hits = self._counter("cache_hits_total",
                                        "Jobs served from the cache, by tier and entry kind "
                                        "(result: no inference; tensor: no decode).",
                                        ["tier", "kind"])
        self.cache_misses = self._counter("cache_misses_total", "Jobs found in no cache tier.")
        self.dead_letters = self._counter("dead_letters_total", "Jobs moved to the dead letters.")
        self.decode_fallbacks = self._counter("decode_fallbacks_total",
                                              "Images the preferred decoder rejected and a "
                                              "fallback decoded.")

    def _histograms(self) -> None:
        self.stage_seconds = Histogram("stage_seconds", "Time per job spent in each stage.",
                                       ["stage"], namespace=NAMESPACE, registry=self.registry,
                                       buckets=STAGE_BUCKETS_S)
        self.batch_size = Histogram("batch_size", "Images per inference batch.",
                                    namespace=NAMESPACE, registry=self.registry,
                                    buckets=BATCH_BUCKETS)

    def _gauges(self) -> None:
        self.in_flight = self._gauge("in_flight_jobs", "Jobs read and not yet published.")
        self.queue_depth = self._gauge("queue_depth", "Entries waiting, by queue.", ["queue"])
        self.model_load = self._gauge("model_load_seconds", "Time to load and warm the model.")
        self.ready = self._gauge("ready", "1 once warmed up and taking jobs, 0 otherwise.")
        self.info = Info(NAMESPACE, "Build and model of this process.",  # -> imgpipe_info
                         registry=self.registry)

    def _zero_series(self) -> None:
        for status in STATUSES:
            self.jobs.labels(status)
        for stage in STAGES:
            self.stage_seconds.labels(stage)

    def _counter(self, name: str, doc: str, labels: Iterable[str] = ()) -> Counter:
        return Counter(name.removesuffix("_total"), doc, list(labels), namespace=NAMESPACE,
                       registry=self.registry)

    def _gauge(self, name: str, doc: str, labels: Iterable[str] = ()) -> Gauge:
        return Gauge(name, doc, list(labels), namespace=NAMESPACE, registry=self.registry)

    # -- what the engine and the daemon call --------------------------------

    def observe_records(self, records: Iterable[Mapping[str, Any]]) -> None:
        """Count finished jobs: outcome, error code, cache level, stage timings."""
        for record in records:
            self._count_outcome(record)
            self._count_cache(record.get("cache"))
            for key, ms in record.get("timings_ms", {}).items():
                stage = TIMING_STAGES.get(key)
                if stage is not None:
                    self.stage_seconds.labels(stage).observe(ms / 1000.0)

    def _count_outcome(self, record: Mapping[str, Any]) -> None:
        status = record["status"]
        if status == "ok":
            self.jobs.labels("ok").inc()
            return
        code = record.get("error", {}).get("code", "unknown")
        expired = status == "expired" or code == EXPIRED
        self.jobs.labels("expired" if expired else "error").inc()
        self.errors.labels(code).inc()

    def _count_cache(self, level: str | None) -> None:
        if level is None:  # cache off, or an error before the lookup
            return
        if level == "miss":
            self.cache_misses.inc()
            return
        kind, _, tier = level.partition(":")  # "result:local", "tensor:redis"
        self.cache_hits.labels(tier or "unknown", kind).inc()

    def observe_batch(self, size: int) -> None:
        self.batch_size.observe(size)

    def observe_stage(self, stage: str, seconds: float) -> None:
        """One job's (or one batch's per-job share of) time in `stage`, one of STAGES."""
        self._stage(stage).observe(seconds)

    def time_stage(self, stage: str) -> Timer:
        """`with metrics.time_stage("publish"):` observes the block's duration."""
        return self._stage(stage).time()

    def _stage(self, stage: str) -> Histogram:
        if stage not in STAGES:
            raise ValueError(f"unknown stage {stage!r}; expected one of {', '.join(STAGES)}")
        return self.stage_seconds.labels(stage)

    def set_in_flight(self, n: int) -> None:
        self.in_flight.set(n)

    def set_queue_depth(self, queue: str, n: int) -> None:
        self.queue_depth.labels(queue).set(n)

    def dead_lettered(self, n: int = 1) -> None:
        self.dead_letters.inc(n)

    def decode_fell_back(self, n: int = 1) -> None:
        self.decode_fallbacks.inc(n)

    def model_loaded(self, seconds: float) -> None:
        self.model_load.set(seconds)

    def set_ready(self, ready: bool) -> None:
        self.ready.set(1 if ready else 0)

    def follow_ready(self, is_ready: Callable[[], bool]) -> None:
        """Read readiness from `is_ready` at each scrape instead of `set_ready`."""
        self.ready.set_function(lambda: 1.0 if is_ready() else 0.0)

    def set_info(self, version: str, model: str, device: str) -> None:
        self.info.info({"version": version, "model": model, "device": device})
