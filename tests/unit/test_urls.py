"""URL jobs: what may be fetched (prefixes, schemes, addresses), and how a fetch
fails, against a real HTTP server on loopback (tests/http_origin.py)."""

from __future__ import annotations

import logging
import socket
import time
from collections.abc import Iterator
from concurrent.futures import Future
from typing import Any

import pytest

from pipeline.config import ServeSettings
from pipeline.errors import InputError
from pipeline.items import Job, Prepared
from pipeline.preprocess import intake, pool
from pipeline.sources import urls
from pipeline.sources.urls import Prefix, UrlFetcher, UrlPolicy, address_allowed, check_url
from pipeline.spec import InputLimits, PreprocessSpec
from pipeline.transport import contract
from tests.http_origin import (
    Origin,
    body,
    certificate_for,
    failing_first,
    redirect,
    running_origin,
    slow,
    trickle,
    truncated,
)

IMAGE = b"\xff\xd8 pretend these are a JPEG's bytes \xff\xd9"
SECRET = "X-Amz-Signature=0123456789abcdef"
LIMIT = 1000


def policy(origin: Origin, **changes: Any) -> UrlPolicy:
    settings: dict[str, Any] = {
        "prefixes": (origin.url("/img/"),), "allow_private": True, "connect_timeout_s": 2.0,
        "read_timeout_s": 1.0, "fetch_timeout_s": 5.0, "retries": 2, "max_redirects": 3,
        "threads": 4, "max_bytes": LIMIT}
    settings.update(changes)
    return UrlPolicy(**settings)


def fetch_error(fetcher: UrlFetcher, url: str) -> InputError:
    with pytest.raises(InputError) as caught:
        fetcher.fetch(url)
    return caught.value


@pytest.fixture
def origin() -> Iterator[Origin]:
    with running_origin() as made:
        yield made


@pytest.fixture
def fetcher(origin: Origin) -> Any:
    made = UrlFetcher(policy(origin))
    yield made
    made.close()


# --- what may be fetched -----------------------------------------------------


@pytest.mark.parametrize(("prefix", "url", "allowed"), [
    ("https://bucket.example.com/", "https://bucket.example.com/a.jpg?sig=1", True),
    ("https://bucket.example.com/", "https://BUCKET.example.com:443/a.jpg", True),
    ("https://bucket.example.com", "https://bucket.example.com.evil.net/a.jpg", False),
    ("https://bucket.example.com/", "http://bucket.example.com/a.jpg", False),
    ("https://bucket.example.com/", "https://bucket.example.com:8443/a.jpg", False),
    ("https://h.example.com/images", "https://h.example.com/images/a.jpg", True),
    ("https://h.example.com/images", "https://h.example.com/images-other/a.jpg", False),
    ("https://h.example.com/images/", "https://h.example.com/images/../secret", False),
    ("https://h.example.com/images/", "https://h.example.com/images/%2e%2e/secret", False),
    ("https://h.example.com/images/", "https://h.example.com/img/a.jpg", False),
])
def test_a_url_is_allowed_only_under_a_prefix_by_host_port_and_path(
        prefix: str, url: str, allowed: bool) -> None:
    prefixes = (Prefix.parse(prefix),)
    if allowed:
        assert check_url(url, prefixes).path.endswith("a.jpg")
    else:
        with pytest.raises(InputError) as caught:
            check_url(url, prefixes)
        assert caught.value.code == "url_not_allowed"


@pytest.mark.parametrize(("url", "code"), [
    ("file:///etc/passwd", "url_not_allowed"),
    ("ftp://bucket.example.com/a.jpg", "url_not_allowed"),
    ("gopher://bucket.example.com/a.jpg", "url_not_allowed"),
    ("https://user:pw@bucket.example.com/a.jpg", "url_not_allowed"),
    ("https:///a.jpg", "invalid_field"),
    ("https://bucket.example.com/a b.jpg", "invalid_field"),
    ("https://bucket.example.com/a.jpg\r\nX-Evil: 1", "invalid_field"),
    ("https://bucket.example.com:99999/a.jpg", "invalid_field"),
    ("a.jpg", "url_not_allowed"),
])
def test_other_schemes_credentials_and_malformed_urls_are_refused(url: str, code: str) -> None:
    with pytest.raises(InputError) as caught:
        check_url(url, (Prefix.parse("https://bucket.example.com/"),))
    assert caught.value.code == code


def test_without_prefixes_every_url_is_refused() -> None:
    with pytest.raises(InputError) as caught:
        check_url("https://bucket.example.com/a.jpg", ())
    assert caught.value.code == "url_not_allowed"
    assert "serve.allowed_url_prefixes" in caught.value.message


@pytest.mark.parametrize(("address", "public"), [
    ("93.184.215.14", True), ("2606:4700::1111", True),
    ("127.0.0.1", False), ("::1", False), ("10.1.2.3", False), ("172.16.0.1", False),
    ("192.168.1.1", False), ("169.254.169.254", False), ("fe80::1%eth0", False),
    ("100.64.0.1", False), ("fc00::1", False), ("::ffff:127.0.0.1", False),
    ("0.0.0.0", False), ("224.0.0.1", False),
])
def test_only_public_addresses_are_allowed_by_default(address: str, public: bool) -> None:
    assert address_allowed(address, allow_private=False) is public
    if address not in ("0.0.0.0", "224.0.0.1"):
        assert address_allowed(address, allow_private=True)


def test_invalid_prefixes_are_refused_at_start_up() -> None:
    for prefix in ["ftp://host/", "https://host/x?sig=1", "not a url", "https://u:p@host/"]:
        with pytest.raises(ValueError):
            ServeSettings(allowed_url_prefixes=[prefix])
    assert ServeSettings(allowed_url_prefixes=["https://host/x/"]).allowed_url_prefixes


# --- the job contract ----------------------------------------------------------


def rules(*prefixes: str) -> contract.JobRules:
    return contract.JobRules("m", 20, 100, [], "p:results",
                             url_prefixes=tuple(Prefix.parse(p) for p in prefixes))


def test_a_url_job_is_parsed_and_checked_against_the_prefixes() -> None:
    url = f"https://bucket.example.com/a.jpg?{SECRET}"
    job = contract.parse_job("1-0", {b"url": url.encode()},
                             rules("https://bucket.example.com/"), 0)
    assert job.error is None and job.url == url and job.image is None and job.data is None
    refused = contract.parse_job("1-0", {b"url": b"https://elsewhere.example.com/a.jpg"},
                                 rules("https://bucket.example.com/"), 0)
    assert refused.error is not None and refused.error.code == "url_not_allowed"
    off = contract.parse_job("1-0", {b"url": url.encode()}, rules(), 0)
    assert off.error is not None and off.error.code == "url_not_allowed"
    assert SECRET not in refused.error.message + off.error.message


def test_a_url_job_names_exactly_one_source() -> None:
    both = contract.parse_job("1-0", {b"url": b"https://b.example.com/a", b"data": b"x"},
                              rules("https://b.example.com/"), 0)
    assert both.error is not None and both.error.code == "conflicting_fields"
    fields = contract.job_fields(url="https://b.example.com/a.jpg", job_id="j")
    assert fields["url"] == "https://b.example.com/a.jpg" and "data" not in fields
    with pytest.raises(ValueError):
        contract.job_fields(url="https://b.example.com/a.jpg", data=b"x")


# --- fetching ---------------------------------------------------------------------


def test_a_body_is_fetched(origin: Origin, fetcher: UrlFetcher) -> None:
    origin.routes["/img/a.jpg"] = body(IMAGE)
    assert fetcher.fetch(origin.url(f"/img/a.jpg?{SECRET}")) == IMAGE
    # the query string went to the server (the signature is the point of it)
    assert origin.request_lines == [f"GET /img/a.jpg?{SECRET} HTTP/1.1"]


def test_a_slow_server_times_out(origin: Origin, fetcher: UrlFetcher) -> None:
    origin.routes["/img/slow.jpg"] = slow(5.0, IMAGE)
    started = time.monotonic()
    error = fetch_error(fetcher, origin.url("/img/slow.jpg"))
    assert error.code == "fetch_timeout"
    assert time.monotonic() - started < 3.0
    assert origin.hits["/img/slow.jpg"] == 1  # a timeout is not retried


def test_a_trickling_server_is_cut_off_at_the_fetch_timeout(origin: Origin) -> None:
    # given a server that sends a byte every 0.2 s: no read ever waits 1 s
    origin.routes["/img/trickle.jpg"] = trickle(IMAGE, 0.2)
    fetcher = UrlFetcher(policy(origin, fetch_timeout_s=1.0))
    started = time.monotonic()
    try:
        error = fetch_error(fetcher, origin.url("/img/trickle.jpg"))
    finally:
        fetcher.close()
    # then it ends at the fetch timeout (plus at most one read), not after the whole body
    assert error.code == "fetch_timeout"
    assert time.monotonic() - started < 3.5


def test_404_is_an_http_error_and_not_retried(origin: Origin, fetcher: UrlFetcher) -> None:
    error = fetch_error(fetcher, origin.url("/img/missing.jpg"))
    assert error.code == "http_error" and "404" in error.message
    assert origin.hits["/img/missing.jpg"] == 1


def test_a_500_is_retried_until_it_succeeds(origin: Origin, fetcher: UrlFetcher) -> None:
    origin.routes["/img/flaky.jpg"] = failing_first(1, body(IMAGE))
    assert fetcher.fetch(origin.url("/img/flaky.jpg")) == IMAGE
    assert origin.hits["/img/flaky.jpg"] == 2


def test_a_500_that_persists_is_an_http_error_after_the_retries(
        origin: Origin, fetcher: UrlFetcher) -> None:
    origin.routes["/img/down.jpg"] = failing_first(100, body(IMAGE), status=503)
    error = fetch_error(fetcher, origin.url("/img/down.jpg"))
    assert error.code == "http_error" and "503" in error.message
    assert origin.hits["/img/down.jpg"] == 3  # the first try and 2 retries


def test_a_body_cut_short_is_retried_then_fails(origin: Origin, fetcher: UrlFetcher) -> None:
    origin.routes["/img/cut.jpg"] = truncated(500, IMAGE)
    error = fetch_error(fetcher, origin.url("/img/cut.jpg"))
    assert error.code == "fetch_failed" and "cut short" in error.message
    assert origin.hits["/img/cut.jpg"] == 3


@pytest.mark.parametrize("length", [True, False])
def test_a_body_over_the_cap_is_refused(origin: Origin, fetcher: UrlFetcher,
                                        length: bool) -> None:
    # given a body one byte over the cap, with or without a Content-Length
    origin.routes["/img/big.jpg"] = body(b"x" * (LIMIT + 1), length=length)
    error = fetch_error(fetcher, origin.url("/img/big.jpg"))
    assert error.code == "data_too_large"
    assert origin.hits["/img/big.jpg"] == 1
    origin.routes["/img/fits.jpg"] = body(b"x" * LIMIT, length=length)
    assert len(fetcher.fetch(origin.url("/img/fits.jpg"))) == LIMIT


def test_a_redirect_inside_the_prefixes_is_followed(origin: Origin,
                                                    fetcher: UrlFetcher) -> None:
    origin.routes["/img/old.jpg"] = redirect("/img/new.jpg")
    origin.routes["/img/new.jpg"] = body(IMAGE)
    assert fetcher.fetch(origin.url("/img/old.jpg")) == IMAGE


@pytest.mark.parametrize("location", ["/private/secret.jpg", "http://example.com/img/a.jpg",
                                      "file:///etc/passwd"])
def test_a_redirect_outside_the_prefixes_is_refused(origin: Origin, fetcher: UrlFetcher,
                                                    location: str) -> None:
    origin.routes["/img/away.jpg"] = redirect(location)
    origin.routes["/private/secret.jpg"] = body(b"secret")
    error = fetch_error(fetcher, origin.url("/img/away.jpg"))
    assert error.code == "url_not_allowed"
    assert origin.hits["/private/secret.jpg"] == 0


def test_redirects_are_followed_a_bounded_number_of_times(origin: Origin,
                                                          fetcher: UrlFetcher) -> None:
    origin.routes["/img/loop.jpg"] = redirect("/img/loop.jpg")
    error = fetch_error(fetcher, origin.url("/img/loop.jpg"))
    assert error.code == "fetch_failed" and "redirects" in error.message
    assert origin.hits["/img/loop.jpg"] == 4  # the first request and 3 redirects


def test_a_url_outside_the_prefixes_is_never_requested(origin: Origin,
                                                       fetcher: UrlFetcher) -> None:
    origin.routes["/private/secret.jpg"] = body(b"secret")
    error = fetch_error(fetcher, origin.url("/private/secret.jpg"))
    assert error.code == "url_not_allowed"
    assert sum(origin.hits.values()) == 0


def test_a_private_address_is_refused_unless_allowed(origin: Origin) -> None:
    origin.routes["/img/a.jpg"] = body(IMAGE)
    refusing = UrlFetcher(policy(origin, allow_private=False))
    try:
        error = fetch_error(refusing, origin.url("/img/a.jpg"))
    finally:
        refusing.close()
    assert error.code == "url_not_allowed" and "127.0.0.1" in error.message
    assert sum(origin.hits.values()) == 0


def test_the_connection_goes_to_the_checked_address_with_the_name_as_host(
        origin: Origin, monkeypatch: pytest.MonkeyPatch) -> None:
    # given a name that resolves to the loopback server once, and elsewhere after
    origin.routes["/img/a.jpg"] = body(IMAGE)
    answers = [[(socket.AF_INET, socket.SOCK_STREAM, 6, "", ("127.0.0.1", origin.port))]]
    asked: list[str] = []
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        if host[0].isdigit():  # an address: nothing to resolve
            return real_getaddrinfo(host, *args, **kwargs)
        asked.append(host)
        return answers.pop(0) if answers else [
            (socket.AF_INET, socket.SOCK_STREAM, 6, "", ("10.9.9.9", origin.port))]

    monkeypatch.setattr(urls.socket, "getaddrinfo", getaddrinfo)
    name = f"http://images.example.test:{origin.port}"
    fetcher = UrlFetcher(UrlPolicy((f"{name}/img/",), allow_private=True, max_bytes=LIMIT))
    try:
        # when it is fetched
        data = fetcher.fetch(f"{name}/img/a.jpg")
    finally:
        fetcher.close()
    # then the name was resolved once, by the check, and the request carried it
    assert data == IMAGE
    assert asked == ["images.example.test"]
    assert origin.hosts == [f"images.example.test:{origin.port}"]


def test_the_query_string_is_never_logged_nor_reported(
        origin: Origin, fetcher: UrlFetcher, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.DEBUG)
    origin.routes["/img/flaky.jpg"] = failing_first(1, body(IMAGE))
    origin.routes["/img/away.jpg"] = redirect("/elsewhere")
    fetcher.fetch(origin.url(f"/img/flaky.jpg?{SECRET}"))
    messages = [fetch_error(fetcher, origin.url(f"/img/{name}?{SECRET}")).message
                for name in ("missing.jpg", "away.jpg")]
    assert "retrying" in caplog.text  # the retry was logged ...
    assert SECRET not in caplog.text  # ... without the signature
    assert all(SECRET not in message and "/img/" in message for message in messages)


# --- fetch-ahead in the preprocessing worker ---------------------------------------


def test_a_chunks_urls_are_fetched_at_once_and_each_failure_stays_its_own(
        origin: Origin, monkeypatch: pytest.MonkeyPatch) -> None:
    # given a worker, and a chunk of four slow URLs, a 404 and inline bytes
    for index in range(4):
        origin.routes[f"/img/{index}.jpg"] = slow(1.0, bytes([index]))
    plan = pool.WorkerPlan("pillow", PreprocessSpec(), InputLimits(),
                           urls=policy(origin, read_timeout_s=5.0))
    monkeypatch.setattr(pool, "_worker", pool._Worker(plan, None, None))  # type: ignore[arg-type]
    jobs = [Job(f"j{index}", url=origin.url(f"/img/{index}.jpg")) for index in range(4)]
    jobs += [Job("missing", url=origin.url("/img/missing.jpg")), Job("inline", data=b"raw")]
    items = [(Prepared(job), None) for job in jobs]
    # when the chunk is read
    started = time.monotonic()
    worker: Any = pool._worker
    read = [(item.job.path, data) for item, _, data in intake.read_all(worker, items)]
    # then the downloads overlapped (one slow response's time, not four)
    assert time.monotonic() - started < 2.5  # one after another: 4 s
    assert read == [("j0", b"\x00"), ("j1", b"\x01"), ("j2", b"\x02"), ("j3", b"\x03"),
                    ("inline", b"raw")]
    missing = items[4][0].error
    assert missing is not None and missing.code == "http_error"
    fetcher = pool._worker.fetcher  # type: ignore[union-attr]
    assert fetcher is not None
    fetcher.close()


def test_without_a_url_policy_the_worker_refuses_url_jobs(monkeypatch: pytest.MonkeyPatch) -> None:
    plan = pool.WorkerPlan("pillow", PreprocessSpec(), InputLimits())
    monkeypatch.setattr(pool, "_worker", pool._Worker(plan, None, None))  # type: ignore[arg-type]
    item = Prepared(Job("j", url="https://bucket.example.com/a.jpg"))
    worker: Any = pool._worker
    assert list(intake.read_all(worker, [(item, None)])) == []
    assert item.error is not None and item.error.code == "url_not_allowed"


def test_the_fetcher_raises_nothing_but_input_errors(
        origin: Origin, fetcher: UrlFetcher, monkeypatch: pytest.MonkeyPatch) -> None:
    def broken(*args: Any) -> Future[bytes]:
        raise RuntimeError(f"bug with {SECRET}")

    monkeypatch.setattr(fetcher, "_fetch", broken)
    error = fetch_error(fetcher, origin.url(f"/img/a.jpg?{SECRET}"))
    assert error.code == "fetch_failed" and SECRET not in error.message


def test_a_name_lookup_that_hangs_does_not_hold_the_job_past_its_timeouts(
        origin: Origin, monkeypatch: pytest.MonkeyPatch) -> None:
    # given a resolver that answers after 4 s
    real_getaddrinfo = socket.getaddrinfo

    def getaddrinfo(host: str, *args: Any, **kwargs: Any) -> Any:
        if not host[0].isdigit():
            time.sleep(4.0)
        return real_getaddrinfo("127.0.0.1", *args, **kwargs)

    monkeypatch.setattr(urls.socket, "getaddrinfo", getaddrinfo)
    origin.routes["/img/a.jpg"] = body(IMAGE)
    name = f"http://images.example.test:{origin.port}"
    fetcher = UrlFetcher(UrlPolicy((f"{name}/img/",), allow_private=True, read_timeout_s=0.5,
                                   fetch_timeout_s=0.5, max_bytes=LIMIT))
    started = time.monotonic()
    try:
        with pytest.raises(InputError) as caught:
            fetcher.submit(f"{name}/img/a.jpg").result()
    finally:
        fetcher.close()
    # then the job's wait ended with its timeouts (0.5 s + 0.5 s + slack)
    assert caught.value.code == "fetch_timeout"
    assert time.monotonic() - started < 3.0


def test_https_goes_to_the_checked_address_with_the_name_for_sni_and_the_certificate(
        tmp_path: Any, monkeypatch: pytest.MonkeyPatch) -> None:
    # given an https server whose certificate names images.imgpipe.test only,
    # and a resolver that sends that name (and another) to it
    ca, cert, key = certificate_for("images.imgpipe.test", tmp_path / "tls")
    real_getaddrinfo = socket.getaddrinfo
    monkeypatch.setattr(urls.socket, "getaddrinfo", lambda host, *args, **kwargs:
                        real_getaddrinfo("127.0.0.1", *args, **kwargs))
    with running_origin((cert, key)) as server:
        server.routes["/img/a.jpg"] = body(IMAGE)
        named, other = (f"https://{host}:{server.port}" for host in
                        ("images.imgpipe.test", "other.imgpipe.test"))
        fetcher = UrlFetcher(UrlPolicy((f"{named}/img/", f"{other}/img/"), allow_private=True,
                                       max_bytes=LIMIT))
        fetcher.manager.connection_pool_kw["ca_certs"] = str(ca)  # the test's private CA
        try:
            # when each is fetched: the certificate fits one name only
            data = fetcher.fetch(f"{named}/img/a.jpg?{SECRET}")
            error = fetch_error(fetcher, f"{other}/img/a.jpg")
        finally:
            fetcher.close()
    assert data == IMAGE
    assert server.hosts == [f"images.imgpipe.test:{server.port}"]
    assert error.code == "fetch_failed" and "TLS" in error.message


def test_dead_list_shows_a_url_job_without_its_query_string() -> None:
    from workers.jobs_cli import _dead_line

    line = _dead_line("1-0", {"url": f"https://bucket.example.com/a.jpg?{SECRET}", "id": "j",
                              "deliveries": "4", "error": {"code": "too_many_deliveries"}})
    assert "url=https://bucket.example.com/a.jpg" in line and SECRET not in line
