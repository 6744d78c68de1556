"""Connections to Redis (the jobs' and the cache's), and riding out outages.

Credentials come from the URL, the environment or a file and are never
logged: only host:port is. While the server is unreachable, or refuses for a
reason that passes (out of memory, read-only during a failover, loading),
callers back off exponentially (capped) and one warning is printed per
outage, not per retry.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable
from typing import Any, Optional, TypeVar
from urllib.parse import urlsplit

import redis
from redis.backoff import NoBackoff
from redis.retry import Retry

from pipeline.config import RedisSettings
from pipeline.errors import ConfigError, TransientError
from pipeline.logs import UNFOLDED

log = logging.getLogger("imgpipe.redis")

URL_SCHEMES = ("redis", "rediss", "unix")
# Lost connections and timeouts mean "server gone": wait and retry.
OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
# So do refusals that pass by themselves: out of memory, a demoted primary or a
# replica, a failover, a server loading its data or busy with a script.
REFUSAL_CLASSES = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError,
                   redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError)
REFUSAL_CODES = ("NOREPLICAS", "MISCONF", "BUSY", "MASTERDOWN", "LOADING", "OOM", "READONLY")
FIRST_BACKOFF_S = 0.05
T = TypeVar("T")


def describe_url(url: str) -> str:
    """host:port (or the socket path) of a Redis URL: safe to log, no password."""
    parts = urlsplit(url)
    if parts.scheme not in URL_SCHEMES:
        raise ConfigError(f"a Redis URL must start with redis://, rediss:// or unix://, "
                          f"got scheme {parts.scheme!r}")
    if parts.scheme == "unix":
        return parts.path
    try:
        port = parts.port or 6379
    except ValueError as exc:
        raise ConfigError("the Redis URL has an invalid port") from exc
    return f"{parts.hostname or 'localhost'}:{port}"


def connect(cfg: RedisSettings, *, extra_timeout_s: float = 0.0,
            health_check_interval_s: int = 30) -> redis.Redis:
    """A client for cfg.url with credentials and TLS applied (lazy: no I/O yet).

    `extra_timeout_s` lengthens the socket timeout for callers that block
    server-side (XREADGROUP BLOCK) on purpose.
    """
    timeout = cfg.timeout_s + extra_timeout_s
    options: dict[str, Any] = {
        "socket_connect_timeout": cfg.timeout_s, "socket_timeout": timeout,
        # redis-py retries 10 times with backoff by default: a dead server would
        # then cost seconds per call. We retry ourselves, with one warning per outage.
        "retry": Retry(NoBackoff(), 0), "health_check_interval": health_check_interval_s,
    }
    if cfg.username:
        options["username"] = cfg.username
    password = _password(cfg)
    if password is not None:
        options["password"] = password
    if cfg.tls_ca_file is not None:
        options["ssl_ca_certs"] = str(cfg.tls_ca_file)
    try:
        return redis.Redis.from_url(cfg.url, **options)
    except ValueError as exc:  # never echo the URL: it may hold a password
        raise ConfigError(f"invalid Redis URL for {describe_url(cfg.url)}") from exc


def _password(cfg: RedisSettings) -> Optional[str]:
    if cfg.password is not None:
        return cfg.password.get_secret_value()
    if cfg.password_file is None:
        return None
    try:
        return cfg.password_file.read_text().strip()
    except OSError as exc:
        raise ConfigError(f"cannot read redis.password_file {cfg.password_file}: "
                          f"{exc.strerror}") from exc


def passing(exc: BaseException) -> bool:
    """Whether `exc` is an outage or a refusal that retrying later gets past."""
    if isinstance(exc, OUTAGE_ERRORS + REFUSAL_CLASSES):
        return True
    return isinstance(exc, redis.ResponseError) and str(exc).startswith(REFUSAL_CODES)


class Outage:
    """Backoff and logging for one connection's outages, shared by its threads."""

    def __init__(self, location: str, max_backoff_s: float) -> None:
        self.location = location
        self.max_backoff_s = max_backoff_s
        self.down = False
        self._backoff_s = FIRST_BACKOFF_S
        self._lock = threading.Lock()

    def failed(self, exc: BaseException) -> float:
        """Record a failure; how long to wait before the next try."""
        with self._lock:
            if not self.down:
                self.down = True
                self._backoff_s = FIRST_BACKOFF_S
                # redis-py's connection errors name host:port only, never the password.
                log.warning("Redis at %s unavailable (%s: %s); retrying with backoff up to "
                            "%g s", self.location, type(exc).__name__, exc, self.max_backoff_s,
                            extra=UNFOLDED)
            wait = self._backoff_s
            self._backoff_s = min(self._backoff_s * 2, self.max_backoff_s)
            return wait

    def recovered(self) -> None:
        if self.down:
            with self._lock:
                if self.down:
                    self.down = False
                    log.warning("Redis at %s is back", self.location, extra=UNFOLDED)

    def retry(self, operation: Callable[[], T], stop: Optional[threading.Event] = None) -> T:
        """Run `operation` until it gets through; TransientError once `stop` is set."""
        while True:
            try:
                result = operation()
            except (*OUTAGE_ERRORS, redis.ResponseError) as exc:
                if not passing(exc):
                    raise
                wait = self.failed(exc)
                if stop is None:
                    time.sleep(wait)
                elif stop.wait(wait):
                    raise TransientError(f"stopped while Redis at {self.location} was "
                                         "unavailable") from exc
                continue
            self.recovered()
            return result
