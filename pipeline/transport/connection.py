"""Connections to Redis (the jobs' and the cache's), and riding out outages.

Credentials come from the URL, the environment or a file and are never
logged: only host:port is. While the server is unreachable, or refuses for a
reason that passes (out of memory, read-only during a failover, loading),
callers back off exponentially (capped) and one warning is printed per
outage, not per retry. Refused credentials and commands the user's ACL denies
do not pass: they are settings errors.
"""

from __future__ import annotations

import logging
import re
import ssl
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
from pipeline.transport import sentinel

log = logging.getLogger("imgpipe.redis")

URL_SCHEMES = ("redis", "rediss", "unix", *sentinel.SCHEMES)
TLS_SCHEMES = ("rediss", "rediss+sentinel")
# Lost connections and timeouts mean "server gone": wait and retry.
OUTAGE_ERRORS = (redis.ConnectionError, redis.TimeoutError, OSError)
# So do refusals that pass by themselves: out of memory, a demoted primary or a
# replica, a failover, a server loading its data or busy with a script.
REFUSAL_CLASSES = (redis.exceptions.OutOfMemoryError, redis.exceptions.ReadOnlyError,
                   redis.exceptions.TryAgainError, redis.exceptions.ClusterDownError)
REFUSAL_CODES = ("NOREPLICAS", "MISCONF", "BUSY", "MASTERDOWN", "LOADING", "OOM", "READONLY")
# Refusals of the login (a wrong password or username, a disabled user, a username
# for a server without ACLs) or of a command or key the user's ACL denies. The
# login's are ConnectionErrors in redis-py, but no retry gets past any of them.
DENIED = (redis.exceptions.AuthenticationError, redis.exceptions.AuthorizationError,
          redis.exceptions.AuthenticationWrongNumberOfArgsError,
          redis.exceptions.NoPermissionError)
# redis-py names a pipeline's failing command, binary arguments and all: keep the reason only.
PIPELINE_ERROR = re.compile(r"^Command # \d+ \(.*\) of pipeline caused error: ", re.DOTALL)
FIRST_BACKOFF_S = 0.05
T = TypeVar("T")


def describe_url(url: str) -> str:
    """host:port (or the socket path, or the Sentinel service and sentinels) of a
    Redis URL: safe to log, no password."""
    if sentinel.is_sentinel_url(url):
        return str(sentinel.parse(url))
    parts = urlsplit(url)
    if parts.scheme not in URL_SCHEMES:
        raise ConfigError(f"a Redis URL must start with redis://, rediss://, unix:// or "
                          f"redis+sentinel://, got scheme {parts.scheme!r}")
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

    A redis+sentinel:// URL gives a client of the service's current primary,
    found again through the sentinels on every reconnection.
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
        options["ssl_ca_certs"] = _tls_ca_file(cfg)
    if sentinel.is_sentinel_url(cfg.url):
        return sentinel.master_for(sentinel.parse(cfg.url), options)
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


def _tls_ca_file(cfg: RedisSettings) -> str:
    """The CA file, checked now: redis-py reads it only when it connects, and a
    failure there would pass for an outage and be retried forever."""
    if urlsplit(cfg.url).scheme not in TLS_SCHEMES:
        raise ConfigError(f"redis.tls_ca_file {cfg.tls_ca_file} needs a rediss:// URL "
                          f"(or rediss+sentinel://); "
                          f"redis.url ({describe_url(cfg.url)}) does not use TLS")
    try:
        ssl.SSLContext(ssl.PROTOCOL_TLS_CLIENT).load_verify_locations(cafile=cfg.tls_ca_file)
    except ssl.SSLError as exc:
        raise ConfigError(f"redis.tls_ca_file {cfg.tls_ca_file} holds no usable CA "
                          f"certificate in PEM ({exc.reason})") from exc
    except OSError as exc:
        raise ConfigError(f"cannot read redis.tls_ca_file {cfg.tls_ca_file}: "
                          f"{exc.strerror}") from exc
    return str(cfg.tls_ca_file)


def server_reason(exc: BaseException) -> str:
    """The server's one-line reply in `exc`, without the command redis-py may prefix."""
    return PIPELINE_ERROR.sub("", str(exc)).strip()


def denial(location: str, exc: BaseException) -> ConfigError:
    """One of DENIED as the settings error it is."""
    return ConfigError(f"Redis at {location}: {denial_reason(exc)}")


def denial_reason(exc: BaseException) -> str:
    """Why Redis said no to one of DENIED, with the settings to check (the server's
    reply never holds the password)."""
    if isinstance(exc, redis.exceptions.NoPermissionError):
        return (f"the user is not allowed a command or key imgpipe needs "
                f"({server_reason(exc)}): check redis.username, redis.prefix and the "
                "user's ACL")
    return (f"authentication failed ({server_reason(exc)}): check the URL, redis.username, "
            "redis.password or redis.password_file")


def passing(exc: BaseException) -> bool:
    """Whether `exc` is an outage or a refusal that retrying later gets past."""
    if isinstance(exc, DENIED):
        return False
    if isinstance(exc, OUTAGE_ERRORS + REFUSAL_CLASSES):
        return True
    # The reply's first word is its code: BUSY passes, BUSYGROUP does not.
    return (isinstance(exc, redis.ResponseError)
            and server_reason(exc).partition(" ")[0] in REFUSAL_CODES)


class Outage:
    """Backoff and logging for one connection's outages, shared by its threads."""

    def __init__(self, location: str, max_backoff_s: float) -> None:
        self.location = location
        self.max_backoff_s = max_backoff_s
        self.down = False
        self._backoff_s = FIRST_BACKOFF_S
        self._lock = threading.Lock()

    def raise_unless_passing(self, exc: BaseException) -> None:
        """Raise `exc` unless waiting gets past it; a denial as the ConfigError it is."""
        if isinstance(exc, DENIED):
            raise denial(self.location, exc) from exc
        if not passing(exc):
            raise exc

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
        """Run `operation` until it gets through; TransientError once `stop` is set,
        ConfigError at once for a denial."""
        while True:
            try:
                result = operation()
            except (*OUTAGE_ERRORS, redis.ResponseError) as exc:
                self.raise_unless_passing(exc)
                wait = self.failed(exc)
                if stop is None:
                    time.sleep(wait)
                elif stop.wait(wait):
                    raise TransientError(f"stopped while Redis at {self.location} was "
                                         "unavailable") from exc
                continue
            self.recovered()
            return result
