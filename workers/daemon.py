"""`imgpipe serve`: the engine fed from a Redis stream, its results back into Redis.

Start-up: the status endpoint (/healthz, /readyz, /metrics), then load and
warm the model, start the preprocessing workers and connect to Redis (waiting
while it is down); only then is the daemon ready (READY=1 to systemd, /readyz
200). While the pipeline makes progress it pings systemd's watchdog; stuck
with work pending for `stall_timeout_s`, it stops, and systemd restarts it.
Unusable settings, refused credentials and commands the user's ACL denies (at
start or later) end it with one line and exit status 2: waiting cannot help.

The first SIGTERM or SIGINT stops reading (STOPPING=1, /readyz 503); jobs in
flight finish, are published and acknowledged, and the process exits 0, or 1
if that takes longer than `drain_grace_s`. A second signal exits at once; its
pending jobs are taken over later, by another daemon or by this one's restart.
"""

from __future__ import annotations

import logging
import os
import signal
import socket
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace
from types import FrameType
from typing import TYPE_CHECKING, Optional, Protocol

from pipeline import notify, status_server
from pipeline.cache import keys as cache_keys
from pipeline.config import Settings
from pipeline.embeddings import answerable
from pipeline.engine import Engine
from pipeline.errors import ConfigError, TransientError
from pipeline.items import Record
from pipeline.metrics import Metrics
from pipeline.sources.urls import Prefix
from pipeline.transport.connection import Outage, connect, describe_url
from pipeline.transport.consumer import StreamSource
from pipeline.transport.contract import JobRules, Keys
from pipeline.transport.publisher import InFlight, ResultPublisher, Streams
from pipeline.transport.sharded import Lane, MergedSource, ShardedPublisher
from pipeline.transport.shards import hash_tag

if TYPE_CHECKING:
    import redis

    from pipeline.sources import ChunkSource

log = logging.getLogger("imgpipe.serve")

EXIT_DRAIN_TIMEOUT = 1


class Shutdown:
    """First signal: stop reading and drain, within a grace period. Second: exit now."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.requested = threading.Event()
        self._callbacks: list[Callable[[], object]] = []

    def install(self) -> None:
        for signum in (signal.SIGTERM, signal.SIGINT):
            signal.signal(signum, self._on_signal)

    def on_stop(self, callback: Callable[[], object]) -> None:
        """Call `callback` when a stop is requested (now, if it already was)."""
        self._callbacks.append(callback)
        if self.requested.is_set():
            callback()

    def _on_signal(self, signum: int, frame: Optional[FrameType]) -> None:
        name = signal.Signals(signum).name
        if self.requested.is_set():
            log.warning("%s again: exiting now; pending jobs will be taken over later", name)
            os._exit(128 + signum)
        self.requested.set()
        log.warning("%s: finishing the jobs in flight (up to %g s), then exiting",
                    name, self.grace_s)
        timer = threading.Timer(self.grace_s, self._grace_over)
        timer.daemon = True
        timer.start()
        for callback in self._callbacks:
            callback()

    def _grace_over(self) -> None:
        log.error("jobs still in flight after %g s: exiting; they will be taken over later",
                  self.grace_s)
        os._exit(EXIT_DRAIN_TIMEOUT)


@dataclass
class ShardLink:
    """A served shard's keys and its own connection and outage record."""

    index: int
    keys: Keys
    client: redis.Redis
    outage: Outage


def serve(settings: Settings) -> int:
    """Run the daemon until a signal stops it; the process's exit status."""
    cfg = settings.serve
    # Settings errors first, before anything starts (connect() does no I/O yet).
    roots = _allowed_roots(settings)
    links = [_link(settings, index) for index in settings.served_shards()]
    metrics = Metrics()
    engine = Engine(settings, max_topk=cfg.max_topk, metrics=metrics,
                    allowed_roots=tuple(roots))
    serving = threading.Event()

    def progressing() -> bool:
        """Alive for /healthz and the watchdog: setting up, or not stuck with work."""
        return not serving.is_set() or engine.progress.age_s() < cfg.stall_timeout_s

    health = status_server.Health(progressing)
    endpoint = status_server.start_configured(settings.metrics, metrics, health)
    shutdown = Shutdown(cfg.drain_grace_s)
    shutdown.on_stop(health.draining)
    shutdown.on_stop(notify.stopping)
    shutdown.install()  # before the slow set-up: a stop during it is honoured
    consumer = cfg.consumer or f"{socket.gethostname()}-{os.getpid()}"
    watchdog: Optional[notify.Watchdog] = None
    lanes: list[Lane] = []
    try:
        engine.setup()
        rules = _rules(settings, engine, roots)
        lanes.extend(_lane(settings, link, consumer, rules, engine.model.name, metrics,
                           lambda: sum(len(lane.in_flight) for lane in lanes))
                     for link in links)
        source: Optional[ChunkSource]
        if len(lanes) == 1:
            # One shard: read and written on the engine's own threads, as ever.
            source, sink, published = _single(lanes[0], shutdown)
            if source is None:
                return 0  # stopped while waiting for Redis: nothing was read
        else:
            source, sink, published = _several(lanes, shutdown)
        health.ready()
        notify.ready(f"serving {engine.model.name} on {engine.device}")
        engine.progress.tick()  # the set-up was progress too
        serving.set()
        watchdog = notify.Watchdog(progressing, _describer(
            published, lanes[0].publisher.in_flight_total))
        watchdog.start()
        log.info("serving %s on %s: consumer %s of group %s reading %s", engine.model.name,
                 engine.device, consumer, cfg.group,
                 ", ".join(f"{link.keys.jobs} at {link.outage.location}" for link in links))
        log.info("preprocessing %s: %s", engine.preprocess_backend,
                 settings.preprocess.describe())
        engine.run(source, sink.write)
        sink.close()
        for lane in lanes:
            lane.source.leave()
    finally:
        if watchdog is not None:
            watchdog.stop()
        engine.close()
        for link in links:
            link.client.close()
        if endpoint is not None:
            endpoint.stop()
    log.info("stopped after answering %d jobs", published())
    return 0


class _Sink(Protocol):
    def write(self, records: list[Record]) -> None: ...

    def close(self) -> None: ...


class _Direct:
    """One shard's publisher as the engine's sink, written on the engine's thread."""

    def __init__(self, publisher: ResultPublisher) -> None:
        self.write = publisher.write

    def close(self) -> None:
        pass


def _single(lane: Lane, shutdown: Shutdown
            ) -> tuple[Optional[StreamSource], _Sink, Callable[[], int]]:
    """The one shard's source, set up (None when stopped while waiting for Redis)."""
    shutdown.on_stop(lane.source.stop)
    try:
        lane.source.setup()
    except TransientError:
        return None, _Direct(lane.publisher), lambda: 0
    return lane.source, _Direct(lane.publisher), lambda: lane.publisher.published


def _several(lanes: list[Lane], shutdown: Shutdown
             ) -> tuple[MergedSource, _Sink, Callable[[], int]]:
    """Several shards merged: each read and written on threads of its own, so
    one shard's Redis being down never holds up the others (nor the start)."""
    source = MergedSource({lane.index: lane.source for lane in lanes})
    sink = ShardedPublisher(lanes)
    shutdown.on_stop(source.stop)
    sink.start()
    source.start()
    return source, sink, lambda: sink.published


def _link(settings: Settings, index: int) -> ShardLink:
    cfg = settings.redis.for_shard(index)
    return ShardLink(index, Keys.of_shard(cfg.prefix, index, cfg.shards),
                     connect(cfg, extra_timeout_s=settings.serve.read_block_ms / 1000),
                     Outage(describe_url(cfg.url), cfg.max_backoff_s))


def _rules(settings: Settings, engine: Engine, roots: list[str]) -> JobRules:
    """What jobs may ask for, before the shard's own streams are filled in."""
    cfg = settings.serve
    return JobRules(engine.model.name, cfg.max_topk, cfg.max_inline_bytes, roots, "",
                    frozenset(), (cache_keys.namespace(settings.cache.prefix) + ":",),
                    tuple(Prefix.parse(prefix) for prefix in cfg.allowed_url_prefixes),
                    # all of a job's views go through the model in one batch
                    max_views=min(cfg.max_views, engine.settings.batching.max_batch_size),
                    outputs=answerable(settings.model.output))


def _lane(settings: Settings, link: ShardLink, consumer: str, rules: JobRules, model: str,
          metrics: Metrics, in_flight_total: Callable[[], int]) -> Lane:
    cfg = settings.serve
    keys = link.keys
    streams = Streams(keys, cfg.group, cfg.results_maxlen, cfg.dead_maxlen,
                      cfg.reply_stream_ttl_s)
    # With shards, a reply stream must share the jobs stream's Redis Cluster slot.
    tag = hash_tag(keys.prefix) if settings.redis.shards > 1 else None
    rules = replace(rules, default_reply_to=keys.results, forbidden_reply_to=keys.own_streams,
                    reply_tag=tag)
    in_flight = InFlight()
    publisher = ResultPublisher(link.client, streams, model, in_flight, link.outage, metrics,
                                in_flight_total)
    source = StreamSource(link.client, streams, consumer, cfg, rules,
                          settings.preprocess.chunk_size, in_flight, publisher, link.outage)
    return Lane(link.index, source, publisher, in_flight)


def _describer(published: Callable[[], int], in_flight: Callable[[], int]
               ) -> Callable[[], str]:
    """systemd's STATUS= line: throughput since the previous call, and work in flight."""
    last = [time.monotonic(), published()]

    def describe() -> str:
        now, answered = time.monotonic(), published()
        rate = (answered - last[1]) / max(now - last[0], 1e-9)
        last[:] = [now, answered]
        return f"{rate:.1f} jobs/s, {in_flight()} in flight, {answered} answered"

    return describe


def _allowed_roots(settings: Settings) -> list[str]:
    roots = []
    for root in settings.serve.allowed_roots:
        real = os.path.realpath(root)
        if not os.path.isdir(real):
            raise ConfigError(f"serve.allowed_roots: {root} is not a directory")
        roots.append(real)
    return roots
