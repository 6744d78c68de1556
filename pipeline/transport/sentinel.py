"""Redis behind Sentinel: `redis+sentinel://` URLs and clients that follow a failover.

    redis+sentinel://[user:password@]host1:port1,host2:port2/service_name[/db]
    rediss+sentinel://...   the same, over TLS (to the sentinels and the data nodes)

The sentinels are asked for the current primary of `service_name` whenever a
connection is made, and a connection to a primary that was demoted (a
READONLY reply) is dropped and made again (redis-py's `Sentinel.master_for`).
The credentials in the URL (or the redis.* settings) are for the data nodes:
the sentinels are reached without them. No sentinel naming a primary is a
ConnectionError, an outage like any other.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import unquote

import redis
from redis.sentinel import MasterNotFoundError, Sentinel

from pipeline.errors import ConfigError

SCHEMES = ("redis+sentinel", "rediss+sentinel")
DEFAULT_SENTINEL_PORT = 26379
# What a sentinel client takes of a data connection's options; never the credentials.
SENTINEL_OPTIONS = ("socket_connect_timeout", "socket_timeout", "retry", "ssl_ca_certs")


@dataclass(frozen=True)
class SentinelUrl:
    """A parsed redis+sentinel:// URL; `str()` is safe to log (no password)."""

    sentinels: tuple[tuple[str, int], ...]
    service: str
    db: int = 0
    username: Optional[str] = None
    password: Optional[str] = None
    tls: bool = False

    def __str__(self) -> str:
        hosts = ",".join(f"{_bracketed(host)}:{port}" for host, port in self.sentinels)
        return f"service {self.service} via sentinels {hosts}"


def is_sentinel_url(url: str) -> bool:
    return url.partition("://")[0] in SCHEMES


def parse(url: str) -> SentinelUrl:
    """The URL's parts, or a ConfigError naming what is wrong (never the password)."""
    scheme, separator, rest = url.partition("://")
    if scheme not in SCHEMES or not separator:
        raise ConfigError(f"a sentinel URL must start with {' or '.join(SCHEMES)}://")
    rest, query, _ = rest.partition("?")
    if query or "#" in rest:
        raise _bad("takes no query string or fragment")
    netloc, _, path = rest.partition("/")
    if "@" in path:
        raise _bad("has an @ after the first /: percent-encode a \"/\" or \"@\" in the "
                   "password (%2F, %40)")
    userinfo, _, hosts = netloc.rpartition("@")
    username, password = _credentials(userinfo)
    return SentinelUrl(_hosts(hosts), *_service_and_db(path), username=username,
                       password=password, tls=scheme == "rediss+sentinel")


def master_for(url: SentinelUrl, options: dict[str, Any]) -> redis.Redis:
    """A client of the service's current primary (lazy: no I/O yet). `options` are
    the data connections' (timeouts, retry, credentials, TLS)."""
    options = {**options, "db": url.db}
    if url.username is not None:
        options["username"] = url.username
    if url.password is not None:
        options["password"] = url.password
    if url.tls:
        options["ssl"] = True
    sentinel_options = {key: options[key] for key in SENTINEL_OPTIONS if key in options}
    if url.tls:
        sentinel_options["ssl"] = True
    manager = Sentinels(list(url.sentinels), sentinel_kwargs=sentinel_options)
    return manager.master_for(url.service, redis_class=SentinelRedis, **options)


class Sentinels(Sentinel):
    """redis-py's Sentinel, with a short reason when none names a primary."""

    def discover_master(self, service_name: str) -> tuple[str, int]:
        try:
            address: tuple[str, int] = super().discover_master(service_name)
        except MasterNotFoundError as exc:
            # redis-py's message holds each sentinel client's whole repr: long,
            # and nothing in it that this does not say.
            raise MasterNotFoundError(
                f"no sentinel (of {len(self.sentinels)}) names a primary for service "
                f"{service_name!r}: unreachable, not monitoring it, or seeing it down"
            ) from exc
        return address


class SentinelRedis(redis.Redis):
    """A primary's client that closes its sentinel clients with it."""

    def close(self) -> None:
        super().close()
        manager: Optional[Sentinel] = getattr(self.connection_pool, "sentinel_manager", None)
        if manager is not None:
            manager.close()


def _credentials(userinfo: str) -> tuple[Optional[str], Optional[str]]:
    if not userinfo:
        return None, None
    user, has_password, password = userinfo.partition(":")
    return (unquote(user) or None), (unquote(password) if has_password else None)


def _hosts(hosts: str) -> tuple[tuple[str, int], ...]:
    if not hosts:
        raise _bad("names no sentinel (host:port,host:port)")
    entries = hosts.split(",")
    return tuple(_host(entry, f"sentinel address {index} of {len(entries)}")
                 for index, entry in enumerate(entries, 1))


def _host(entry: str, which: str) -> tuple[str, int]:
    """host, host:port, [v6], [v6]:port. Errors name the address by position only: a
    password holding an unescaped "/" or "@" would otherwise show in them."""
    if entry.startswith("["):
        host, bracket, port = entry[1:].partition("]")
        if not bracket or (port and not port.startswith(":")):
            raise _bad(f"has an unusable {which} (an IPv6 address goes in [brackets])")
        port = port[1:]
    else:
        host, _, port = entry.partition(":")
    if not host:
        raise _bad(f"has an empty host in {which}")
    if not port:
        return host, DEFAULT_SENTINEL_PORT
    if not port.isdigit() or not 0 < int(port) < 65536:
        raise _bad(f"has an invalid port in {which} (1-65535)")
    return host, int(port)


def _service_and_db(path: str) -> tuple[str, int]:
    service, _, db = path.partition("/")
    if not service:
        raise _bad("names no service (the primary's name in the sentinels' configuration)"
                   ": .../service_name[/db]")
    if "/" in db:
        raise _bad("has a path longer than /service_name/db")
    if db and not db.isdigit():
        raise _bad("has a database number (after service_name/) that is not a number")
    return unquote(service), int(db or 0)


def _bad(what: str) -> ConfigError:
    # The URL itself is never echoed: it may hold a password.
    return ConfigError(f"the sentinel URL {what}")


def _bracketed(host: str) -> str:
    return f"[{host}]" if ":" in host else host
