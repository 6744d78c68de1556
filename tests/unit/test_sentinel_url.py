"""redis+sentinel:// URLs: parsed into sentinels, service, db and credentials;
unusable ones refused with one line that never holds the password."""

from __future__ import annotations

from pathlib import Path

import pytest
from redis.connection import SSLConnection
from redis.sentinel import SentinelManagedSSLConnection

from pipeline.config import RedisSettings, load_settings
from pipeline.errors import ConfigError
from pipeline.transport import sentinel
from pipeline.transport.connection import connect, describe_url
from pipeline.transport.sentinel import SentinelRedis, SentinelUrl
from tests.redis_server import TlsFiles

SECRET = "s3cr3t-pw"


@pytest.mark.parametrize(("url", "expected"), [
    ("redis+sentinel://10.0.0.1:26380,10.0.0.2:26381/jobs",
     SentinelUrl((("10.0.0.1", 26380), ("10.0.0.2", 26381)), "jobs")),
    ("redis+sentinel://sentinel-a,sentinel-b/jobs/3",
     SentinelUrl((("sentinel-a", 26379), ("sentinel-b", 26379)), "jobs", 3)),
    ("redis+sentinel://[::1]:26379,[fe80::2]/jobs",
     SentinelUrl((("::1", 26379), ("fe80::2", 26379)), "jobs")),
    ("redis+sentinel://worker:p%40ss%2Fw@h:1/jobs",
     SentinelUrl((("h", 1),), "jobs", username="worker", password="p@ss/w")),
    ("redis+sentinel://:only-password@h:1/jobs/0",
     SentinelUrl((("h", 1),), "jobs", password="only-password")),
    ("rediss+sentinel://h:1/jobs", SentinelUrl((("h", 1),), "jobs", tls=True)),
])
def test_a_sentinel_url_is_parsed_into_its_parts(url: str, expected: SentinelUrl) -> None:
    assert sentinel.parse(url) == expected


@pytest.mark.parametrize(("url", "reason"), [
    (f"redis+sentinel://u:{SECRET}@/jobs", "names no sentinel"),
    (f"redis+sentinel://u:{SECRET}@h:1", "names no service"),
    (f"redis+sentinel://u:{SECRET}@h:1/", "names no service"),
    (f"redis+sentinel://u:{SECRET}@h:port/jobs", "invalid port in sentinel address 1 of 1"),
    (f"redis+sentinel://u:{SECRET}@h:1,h:70000/jobs", "invalid port in sentinel address 2 of 2"),
    (f"redis+sentinel://u:{SECRET}@h:1,,h:2/jobs", "empty host in sentinel address 2 of 3"),
    (f"redis+sentinel://u:{SECRET}@[::1/jobs", "IPv6 address goes in [brackets]"),
    (f"redis+sentinel://u:{SECRET}@h:1/jobs/zero", "database number"),
    (f"redis+sentinel://u:{SECRET}@h:1/jobs/0/x", "longer than /service_name/db"),
    (f"redis+sentinel://u:{SECRET}@h:1/jobs?db=1", "no query string"),
    # an unescaped "/" in the password ends the host list inside it
    (f"redis+sentinel://u:{SECRET}/x@h:1/jobs", "percent-encode"),
    (f"redis+sentinel://u:12/{SECRET}@h:1/jobs", "percent-encode"),
])
def test_an_unusable_sentinel_url_is_one_line_naming_the_fault_never_the_password(
        url: str, reason: str) -> None:
    for attempt in (lambda: describe_url(url), lambda: connect(RedisSettings(url=url))):
        with pytest.raises(ConfigError) as caught:
            attempt()
        message = str(caught.value)
        assert reason in message
        assert "\n" not in message
        assert SECRET not in message


def test_the_description_names_the_service_and_sentinels_not_the_password() -> None:
    url = f"redis+sentinel://worker:{SECRET}@10.0.0.1:26380,[::1]:26381/jobs/2"
    assert describe_url(url) == "service jobs via sentinels 10.0.0.1:26380,[::1]:26381"


def test_connect_gives_a_client_of_the_services_primary_with_the_urls_credentials() -> None:
    # given a sentinel URL with credentials, and settings with a timeout (no I/O yet)
    url = f"redis+sentinel://worker:{SECRET}@127.0.0.1:26380,127.0.0.1:26381/jobs/2"
    client = connect(RedisSettings(url=url, timeout_s=1.5))
    # then it is a client of the service's primary, the credentials and db for the
    # data connections, and the sentinels reached without them
    assert isinstance(client, SentinelRedis)
    pool = client.connection_pool
    assert pool.service_name == "jobs"  # type: ignore[attr-defined]
    kwargs = pool.connection_kwargs
    assert (kwargs["username"], kwargs["password"], kwargs["db"]) == ("worker", SECRET, 2)
    assert kwargs["socket_timeout"] == 1.5
    manager = pool.sentinel_manager  # type: ignore[attr-defined]
    sentinel_kwargs = [s.connection_pool.connection_kwargs for s in manager.sentinels]
    assert [(k["host"], k["port"]) for k in sentinel_kwargs] == [("127.0.0.1", 26380),
                                                                 ("127.0.0.1", 26381)]
    assert all("password" not in k or k["password"] is None for k in sentinel_kwargs)
    assert all(k["socket_timeout"] == 1.5 for k in sentinel_kwargs)
    client.close()


def test_a_rediss_sentinel_url_uses_tls_to_the_sentinels_and_the_servers(
        tmp_path: Path) -> None:
    ca = tmp_path / "ca.pem"
    TlsFiles.make(tmp_path)
    client = connect(RedisSettings(url="rediss+sentinel://h:1/jobs", tls_ca_file=ca))
    pool = client.connection_pool
    assert issubclass(pool.connection_class, SentinelManagedSSLConnection)
    assert pool.connection_kwargs["ssl_ca_certs"] == str(ca)
    manager = pool.sentinel_manager  # type: ignore[attr-defined]
    sentinel_pool = manager.sentinels[0].connection_pool
    assert issubclass(sentinel_pool.connection_class, SSLConnection)
    assert sentinel_pool.connection_kwargs["ssl_ca_certs"] == str(ca)
    client.close()


def test_a_password_setting_is_used_when_the_url_has_none() -> None:
    client = connect(RedisSettings(url="redis+sentinel://h:1/jobs", password=SECRET))
    assert client.connection_pool.connection_kwargs["password"] == SECRET
    client.close()


def test_a_ca_file_with_a_plain_sentinel_url_is_refused() -> None:
    with pytest.raises(ConfigError, match=r"needs a rediss:// URL \(or rediss\+sentinel://\)"):
        connect(RedisSettings(url="redis+sentinel://h:1/jobs", tls_ca_file="/dev/null"))


@pytest.mark.parametrize("variable", ["IMGPIPE_REDIS_URL", "IMGPIPE_CACHE__REDIS_URL"])
def test_both_redis_settings_take_a_sentinel_url_from_the_environment(variable: str) -> None:
    url = "redis+sentinel://127.0.0.1:26380/jobs"
    settings = load_settings(environ={variable: url})
    cache = settings.cache.redis()
    used = settings.redis.url if variable == "IMGPIPE_REDIS_URL" else cache and cache.url
    assert used == url


def test_an_unknown_scheme_is_still_refused_by_the_settings() -> None:
    with pytest.raises(ConfigError, match="redis.url = <redacted>"):
        load_settings(environ={"IMGPIPE_REDIS_URL": f"sentinel://u:{SECRET}@h/jobs"})
