"""`imgpipe doctor`'s Redis checks: the jobs Redis (each shard on a server of
its own) and the cache's shared tier. Each server gets PING and INFO only,
within REDIS_PROBE_TIMEOUT_S, and only its host:port is ever named.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

from pipeline.check import FAIL, OK, SKIP, WARN, Check
from pipeline.config import CacheSettings, RedisSettings, Settings
from pipeline.errors import ConfigError, first_line
from pipeline.transport.connection import DENIED, connect, denial_reason, describe_url

REDIS_PROBE_TIMEOUT_S = 2.0
# `serve` reclaims jobs of dead consumers with XAUTOCLAIM (Redis 6.2).
SERVE_MIN_REDIS = (6, 2)


def cache_redis(cfg: CacheSettings) -> Check:
    server = cfg.redis()
    if server is None:
        return Check("cache redis", SKIP, "no shared tier (cache.redis_url unset)")
    where = _where(server.url)
    try:
        info = _redis_info(server)
    except ConfigError as exc:  # the engine refuses a malformed URL at start
        return Check("cache redis", FAIL, str(exc))
    except Exception as exc:  # anything else only costs the shared tier
        return Check("cache redis", WARN, f"{where}: {_redis_problem(exc)}; the engine "
                                          "runs without the shared tier")
    return Check("cache redis", OK, f"{where}: Redis {info.get('redis_version', '?')}")


def jobs_redis(settings: Settings, serve: bool) -> list[Check]:
    cfg = settings.redis
    if not cfg.shard_urls:
        return _redis_server(cfg, serve)
    # Shards on servers of their own: each is needed, each is checked.
    return [replace(check, name=f"{check.name} (shard {index})")
            for index in range(cfg.shards)
            for check in _redis_server(cfg.for_shard(index), serve)]


def _redis_server(cfg: RedisSettings, serve: bool) -> list[Check]:
    where = _where(cfg.url)
    try:
        info = _redis_info(cfg)
    except Exception as exc:  # ConfigError (URL, password_file) fails too
        import redis

        outage = isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError))
        status = WARN if outage and not isinstance(exc, DENIED) and not serve else FAIL
        needed = " (needed by serve, submit, status and dead)" if status == WARN else ""
        skipped = Check("redis persistence", SKIP, "Redis not reached")
        return [Check("redis", status, f"{where}: {_redis_problem(exc)}{needed}"),
                skipped, replace(skipped, name="redis eviction")]
    return [_redis_version(where, info, serve), _persistence(info), _eviction(info)]


def _where(url: str) -> str:
    try:
        return describe_url(url)
    except (ConfigError, ValueError):
        return "Redis"


def _redis_info(cfg: RedisSettings) -> dict[str, Any]:
    """PING, then INFO server, persistence and memory ({} where INFO is not permitted)."""
    import redis

    describe_url(cfg.url)  # ConfigError for what connect() would choke on later
    client = connect(cfg.model_copy(
        update={"timeout_s": min(cfg.timeout_s, REDIS_PROBE_TIMEOUT_S)}))
    try:
        client.ping()
        info: dict[str, Any] = {}
        try:
            for section in ("server", "persistence", "memory"):
                info.update(client.info(section))
        except redis.ResponseError:  # an ACL user without +info: PING was enough
            pass
        return info
    finally:
        client.close()


def _redis_problem(exc: Exception) -> str:
    """One line on why Redis could not be used (redis-py names host:port, no password)."""
    import redis

    if isinstance(exc, ConfigError):
        return str(exc)
    if isinstance(exc, DENIED):
        return denial_reason(exc)
    if isinstance(exc, (redis.ConnectionError, redis.TimeoutError, OSError)):
        return f"unreachable ({first_line(exc)})"
    return f"{type(exc).__name__}: {first_line(exc)}"


def _redis_version(where: str, info: dict[str, Any], serve: bool) -> Check:
    version = str(info.get("redis_version", ""))
    if not version:
        return Check("redis", OK, f"{where}: reachable (INFO not permitted)")
    parts = tuple(int(p) for p in version.split(".")[:2] if p.isdigit())
    if parts < SERVE_MIN_REDIS:
        needed = ".".join(map(str, SERVE_MIN_REDIS))
        return Check("redis", FAIL if serve else WARN,
                     f"{where}: Redis {version}; serve needs {needed} or later (XAUTOCLAIM)")
    return Check("redis", OK, f"{where}: Redis {version}")


def _persistence(info: dict[str, Any]) -> Check:
    if "aof_enabled" not in info:
        return Check("redis persistence", SKIP, "unknown: INFO not permitted")
    if not int(info["aof_enabled"]):
        return Check("redis persistence", WARN,
                     "AOF off: queued jobs and unread results since the last snapshot are "
                     "lost if Redis restarts (set appendonly yes)")
    if info.get("aof_last_write_status", "ok") != "ok":
        return Check("redis persistence", WARN, "AOF on, but its last write failed "
                                                f"({info['aof_last_write_status']})")
    return Check("redis persistence", OK, "AOF on")


def _eviction(info: dict[str, Any]) -> Check:
    if "maxmemory_policy" not in info:
        return Check("redis eviction", SKIP, "unknown: INFO not permitted")
    policy, limit = str(info["maxmemory_policy"]), int(info.get("maxmemory", 0))
    if limit == 0:
        return Check("redis eviction", OK, f"no maxmemory: nothing is evicted ({policy})")
    where = f"maxmemory-policy {policy}, maxmemory {limit / 1024**2:.0f} MiB"
    if policy.startswith("allkeys"):
        return Check("redis eviction", WARN, f"{where}: job and result streams can be "
                                             "evicted when memory is full; use noeviction")
    if policy.startswith("volatile"):
        return Check("redis eviction", OK, f"{where}: only keys with a TTL are evicted "
                                           "(imgpipe's streams have none)")
    return Check("redis eviction", OK, f"{where}: writes fail when memory is full")
