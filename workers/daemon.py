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
from types import FrameType
from typing import Optional

from pipeline import notify, status_server
from pipeline.cache import keys as cache_keys
from pipeline.config import Settings
from pipeline.embeddings import answerable
from pipeline.engine import Engine
from pipeline.errors import ConfigError, TransientError
from pipeline.metrics import Metrics
from pipeline.sources.urls import Prefix
from pipeline.transport.connection import Outage, connect, describe_url
from pipeline.transport.consumer import StreamSource
from pipeline.transport.contract import JobRules, Keys
from pipeline.transport.publisher import InFlight, ResultPublisher, Streams

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


def serve(settings: Settings) -> int:
    """Run the daemon until a signal stops it; the process's exit status."""
    cfg = settings.serve
    # Settings errors first, before anything starts (connect() does no I/O yet).
    roots = _allowed_roots(settings)
    client = connect(settings.redis, extra_timeout_s=cfg.read_block_ms / 1000)
    outage = Outage(describe_url(settings.redis.url), settings.redis.max_backoff_s)
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
    keys = Keys(settings.redis.prefix)
    streams = Streams(keys, cfg.group, cfg.results_maxlen, cfg.dead_maxlen,
                      cfg.reply_stream_ttl_s)
    consumer = cfg.consumer or f"{socket.gethostname()}-{os.getpid()}"
    watchdog: Optional[notify.Watchdog] = None
    try:
        engine.setup()
        in_flight = InFlight()
        publisher = ResultPublisher(client, streams, engine.model.name, in_flight, outage,
                                    metrics)
        rules = JobRules(engine.model.name, cfg.max_topk, cfg.max_inline_bytes, roots,
                         keys.results, keys.own_streams,
                         (cache_keys.namespace(settings.cache.prefix) + ":",),
                         tuple(Prefix.parse(prefix) for prefix in cfg.allowed_url_prefixes),
                         # all of a job's views go through the model in one batch
                         max_views=min(cfg.max_views, engine.settings.batching.max_batch_size),
                         outputs=answerable(settings.model.output))
        source = StreamSource(client, streams, consumer, cfg, rules,
                              settings.preprocess.chunk_size, in_flight, publisher, outage)
        shutdown.on_stop(source.stop)
        try:
            source.setup()
        except TransientError:
            return 0  # stopped while waiting for Redis: nothing was read
        health.ready()
        notify.ready(f"serving {engine.model.name} on {engine.device}")
        engine.progress.tick()  # the set-up was progress too
        serving.set()
        watchdog = notify.Watchdog(progressing, _describer(publisher, in_flight))
        watchdog.start()
        log.info("serving %s on %s: consumer %s of group %s reading %s at %s",
                 engine.model.name, engine.device, consumer, cfg.group, keys.jobs,
                 outage.location)
        log.info("preprocessing %s: %s", engine.preprocess_backend,
                 settings.preprocess.describe())
        engine.run(source, publisher.write)
        source.leave()
    finally:
        if watchdog is not None:
            watchdog.stop()
        engine.close()
        client.close()
        if endpoint is not None:
            endpoint.stop()
    log.info("stopped after answering %d jobs", publisher.published)
    return 0


def _describer(publisher: ResultPublisher, in_flight: InFlight) -> Callable[[], str]:
    """systemd's STATUS= line: throughput since the previous call, and work in flight."""
    last = [time.monotonic(), publisher.published]

    def describe() -> str:
        now, answered = time.monotonic(), publisher.published
        rate = (answered - last[1]) / max(now - last[0], 1e-9)
        last[:] = [now, answered]
        return f"{rate:.1f} jobs/s, {len(in_flight)} in flight, {answered} answered"

    return describe


def _allowed_roots(settings: Settings) -> list[str]:
    roots = []
    for root in settings.serve.allowed_roots:
        real = os.path.realpath(root)
        if not os.path.isdir(real):
            raise ConfigError(f"serve.allowed_roots: {root} is not a directory")
        roots.append(real)
    return roots
