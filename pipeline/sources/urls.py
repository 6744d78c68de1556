"""Fetching URL jobs: an http(s) GET confined to allowed prefixes and, by
default, to public addresses.

Meant for pre-signed object-store URLs: the daemon holds no storage
credentials, the URL does, in its query string. So the query string is never
logged nor put in a message: `shown()` is what a URL looks like anywhere but
on the wire.

Every hop is checked before it is fetched: the scheme (http or https), the
prefix (`serve.allowed_url_prefixes`, matched by scheme, host, port and path,
never as a bare string prefix) and the host's addresses (loopback, private,
link-local and other non-global ranges refused unless
`serve.allow_private_urls`). The connection then goes to the very address
that was checked, with the Host header and TLS SNI/certificate check set to
the name, so a DNS answer that changes between check and connect (DNS
rebinding) cannot lead anywhere else. Redirects are followed here, one hop at
a time, each checked the same way, at most `max_redirects` of them.

A fetch never raises anything but InputError, with one of the codes
url_not_allowed, fetch_failed, fetch_timeout, http_error and data_too_large.
Transient failures (a 5xx status, a connection refused, reset or cut short)
are retried `retries` times with a short backoff; permanent ones (a 4xx
status, a refused URL, a body over the cap) are not, nor are timeouts: a
fetch ends within `fetch_timeout_s` of being queued, plus at most one
`read_timeout_s` for the read under way.

urllib3 is imported only when a fetcher is made: commands that never fetch
do not pay for it.
"""

from __future__ import annotations

import ipaddress
import logging
import socket
import time
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass
from typing import Any, Optional
from urllib.parse import unquote, urljoin, urlsplit

from pipeline.errors import InputError

log = logging.getLogger("imgpipe.preprocess")
# urllib3 logs request lines (with their query strings) at DEBUG: never let them out.
logging.getLogger("urllib3").setLevel(logging.WARNING)

DEFAULT_PORTS = {"http": 80, "https": 443}
MAX_URL_CHARS = 8192
READ_BYTES = 64 * 1024
RETRY_BACKOFF_S = 0.2  # doubled after each retry
REDIRECT_STATUSES = frozenset({301, 302, 303, 307, 308})
MAX_POOLS = 32  # hosts (addresses) with connections kept alive
WAIT_SLACK_S = 1.0  # past a fetch's own timeouts, before its result is given up on


class _Transient(Exception):
    """A failure worth another try; carries the InputError to report if none is left."""

    def __init__(self, error: InputError) -> None:
        super().__init__(error.message)
        self.error = error


@dataclass(frozen=True)
class Target:
    """One URL, parsed: what a request needs and what may be shown of it."""

    scheme: str
    host: str  # lower case, IPv6 without brackets
    port: int
    path: str  # the path alone, for prefix matching
    request_target: str  # path and query: what goes on the request line

    def shown(self) -> str:
        """The URL without its query string (it may hold a signature)."""
        return f"{self.scheme}://{self.host_header()}{self.path}"

    def host_header(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return host if self.port == DEFAULT_PORTS[self.scheme] else f"{host}:{self.port}"


def parse_url(text: str, field: str = "url") -> Target:
    """`text` as a Target; InputError (invalid_field, url_not_allowed) when it is
    no absolute http(s) URL or has parts that are refused."""
    if not text or len(text) > MAX_URL_CHARS:
        raise InputError("invalid_field", f"field {field}: must be 1 to {MAX_URL_CHARS} "
                         "characters")
    if any(ord(char) <= 0x20 or ord(char) >= 0x7F for char in text):
        raise InputError("invalid_field", f"field {field}: URLs must be ASCII without spaces "
                         "or control characters (percent-encode the rest)")
    try:
        parts = urlsplit(text)
        port = parts.port
    except ValueError:
        raise InputError("invalid_field", f"field {field}: not a valid URL") from None
    scheme = parts.scheme.lower()
    if scheme not in DEFAULT_PORTS:
        raise InputError("url_not_allowed", f"field {field}: scheme {scheme[:20]!r} is "
                         "refused; only http and https URLs are fetched")
    if not parts.hostname:
        raise InputError("invalid_field", f"field {field}: the URL names no host")
    if parts.username is not None or parts.password is not None:
        raise InputError("url_not_allowed", f"field {field}: URLs with credentials "
                         "(user@host) are refused")
    path = parts.path or "/"
    segments = unquote(path).replace("\\", "/").split("/")
    if any(segment in (".", "..") for segment in segments):
        raise InputError("url_not_allowed", f"field {field}: URLs with . or .. path "
                         "segments are refused")
    query = f"?{parts.query}" if parts.query else ""
    return Target(scheme, parts.hostname.lower(), port or DEFAULT_PORTS[scheme], path,
                  path + query)


def shown(url: str) -> str:
    """`url` as it may be logged or reported: no query string, no credentials."""
    try:
        return parse_url(url).shown()
    except InputError:
        return "<an invalid URL>"


@dataclass(frozen=True)
class Prefix:
    """An allowed URL prefix: same scheme, host and port; the path beneath its path."""

    scheme: str
    host: str
    port: int
    path: str

    @classmethod
    def parse(cls, text: str) -> Prefix:
        """ValueError, in words, when `text` is no valid prefix."""
        try:
            target = parse_url(text, "prefix")
        except InputError as exc:
            raise ValueError(f"{text!r}: {exc.message.removeprefix('field prefix: ')}") \
                from None
        if target.request_target != target.path or "#" in text:
            raise ValueError(f"{text!r}: a prefix has no query string or fragment")
        return cls(target.scheme, target.host, target.port, target.path)

    def matches(self, target: Target) -> bool:
        if (target.scheme, target.host, target.port) != (self.scheme, self.host, self.port):
            return False
        if self.path.endswith("/"):
            return target.path.startswith(self.path)
        # "/bucket" allows "/bucket" and "/bucket/...", not "/bucket-other".
        return target.path == self.path or target.path.startswith(self.path + "/")


@dataclass(frozen=True)
class UrlPolicy:
    """What the preprocessing workers may fetch, and how (serve.* settings)."""

    prefixes: tuple[str, ...] = ()
    allow_private: bool = False
    connect_timeout_s: float = 5.0
    read_timeout_s: float = 10.0
    fetch_timeout_s: float = 30.0
    retries: int = 2
    max_redirects: int = 5
    threads: int = 4
    max_bytes: int = 64 * 1024 * 1024

    def parsed_prefixes(self) -> tuple[Prefix, ...]:
        return tuple(Prefix.parse(prefix) for prefix in self.prefixes)

    def check(self, url: str, prefixes: Optional[tuple[Prefix, ...]] = None) -> Target:
        """The parsed URL if it lies under an allowed prefix; else InputError."""
        return check_url(url, self.parsed_prefixes() if prefixes is None else prefixes)


def check_url(url: str, prefixes: tuple[Prefix, ...], field: str = "url") -> Target:
    """`url` parsed, if it lies under one of `prefixes`; else InputError."""
    if not prefixes:
        raise InputError("url_not_allowed", "URL jobs are disabled here (no "
                         "serve.allowed_url_prefixes configured); send the image as data")
    target = parse_url(url, field)
    if not any(prefix.matches(target) for prefix in prefixes):
        raise InputError("url_not_allowed", f"{target.shown()[:300]} is not under any of "
                         "serve.allowed_url_prefixes")
    return target


def address_allowed(address: str, allow_private: bool) -> bool:
    """Whether a connection may go to `address` (an IP literal)."""
    ip = ipaddress.ip_address(address.split("%", 1)[0])  # an IPv6 scope id: "fe80::1%eth0"
    if isinstance(ip, ipaddress.IPv6Address) and ip.ipv4_mapped is not None:
        ip = ip.ipv4_mapped
    if ip.is_unspecified or ip.is_multicast:
        return False
    return allow_private or ip.is_global


class Fetch:
    """A fetch under way (UrlFetcher.submit), or refused before it began (`refused`)."""

    def __init__(self, future: Future[bytes], wait_until: float, shown_url: str) -> None:
        self.future = future
        self.wait_until = wait_until
        self.shown_url = shown_url

    @classmethod
    def refused(cls, error: InputError) -> Fetch:
        future: Future[bytes] = Future()
        future.set_exception(error)
        return cls(future, 0.0, "")

    def result(self) -> bytes:
        """The body, or the fetch's InputError. Waits until the fetch's own
        timeouts would have ended it and no longer, whatever blocks it (a DNS
        lookup has no timeout of ours; a thread stuck in one is left to finish)."""
        try:
            return self.future.result(timeout=max(0.0, self.wait_until - time.monotonic()))
        except FutureTimeout:
            self.future.cancel()
            raise InputError("fetch_timeout", f"{self.shown_url[:200]}: not fetched in "
                             "time (a slow name lookup or a busy fetcher)") from None
        except InputError:
            raise
        except Exception as exc:  # fetch() raises only InputError: a backstop
            raise InputError("fetch_failed", f"unexpected {type(exc).__name__}") from None


class UrlFetcher:
    """Fetches URLs in a few threads, over a bounded pool of kept-alive connections."""

    def __init__(self, policy: UrlPolicy) -> None:
        import urllib3  # only where URLs are fetched

        self.policy = policy
        self.prefixes = policy.parsed_prefixes()
        self._urllib3 = urllib3
        # block=False: the threads bound how many connections are open at once;
        # maxsize how many are kept alive per address, num_pools for how many addresses.
        self.manager = urllib3.PoolManager(num_pools=MAX_POOLS, maxsize=policy.threads,
                                           block=False, retries=False)
        self.executor = ThreadPoolExecutor(policy.threads, thread_name_prefix="imgpipe-fetch")

    def submit(self, url: str) -> Fetch:
        """Start fetching `url`; its deadline runs from now, queued or not."""
        deadline = time.monotonic() + self.policy.fetch_timeout_s
        # A fetch under way ends by then: a last read may take read_timeout_s.
        wait_until = deadline + self.policy.read_timeout_s + WAIT_SLACK_S
        return Fetch(self.executor.submit(self.fetch, url, deadline), wait_until, shown(url))

    def fetch(self, url: str, deadline: Optional[float] = None) -> bytes:
        """The body of `url`; InputError for every failure, never anything else."""
        if deadline is None:
            deadline = time.monotonic() + self.policy.fetch_timeout_s
        try:
            return self._fetch(url, deadline)
        except InputError:
            raise
        except Exception as exc:  # a backstop: a URL job must never raise anything else
            log.error("fetching %s failed: unexpected %s", shown(url), type(exc).__name__)
            raise InputError("fetch_failed", f"unexpected {type(exc).__name__} while "
                             "fetching the URL") from None

    def close(self) -> None:
        self.executor.shutdown(wait=False, cancel_futures=True)
        self.manager.clear()

    def _fetch(self, url: str, deadline: float) -> bytes:
        target = check_url(url, self.prefixes)
        for _ in range(self.policy.max_redirects + 1):
            location = self._with_retries(target, deadline)
            if isinstance(location, bytes):
                return location
            try:
                target = check_url(location, self.prefixes, "redirect")
            except InputError as exc:
                raise InputError(exc.code, f"{target.shown()[:200]} redirects: "
                                 f"{exc.message}") from None
        raise InputError("fetch_failed", f"{target.shown()[:200]}: more than "
                         f"{self.policy.max_redirects} redirects")

    def _with_retries(self, target: Target, deadline: float) -> bytes | str:
        """The body, or where a redirect leads (an absolute URL)."""
        address = self._resolve(target)
        attempt = 0
        while True:
            try:
                return self._request(target, address, deadline)
            except _Transient as exc:
                backoff = RETRY_BACKOFF_S * 2 ** attempt
                if attempt >= self.policy.retries or time.monotonic() + backoff >= deadline:
                    raise exc.error from None
                log.info("fetching %s: %s; retrying in %g s", target.shown(), exc.error.message,
                         backoff)
                time.sleep(backoff)
                attempt += 1

    def _resolve(self, target: Target) -> str:
        """The address to connect to, after checking every address the name has."""
        try:
            infos = socket.getaddrinfo(target.host, target.port, type=socket.SOCK_STREAM)
        except (socket.gaierror, UnicodeError) as exc:
            reason = exc.strerror if isinstance(exc, socket.gaierror) else "invalid name"
            raise InputError("fetch_failed", f"cannot resolve {target.host[:200]}: "
                             f"{reason}") from None
        addresses = [str(info[4][0]) for info in infos]
        refused = [a for a in addresses if not address_allowed(a, self.policy.allow_private)]
        if refused or not addresses:
            raise InputError("url_not_allowed", f"{target.host[:200]} resolves to "
                             f"{', '.join(refused[:3]) or 'nothing'}: a loopback, private, "
                             "link-local or otherwise non-public address (allowed only "
                             "with serve.allow_private_urls)")
        return addresses[0]

    def _request(self, target: Target, address: str, deadline: float) -> bytes | str:
        urllib3 = self._urllib3
        remaining = deadline - time.monotonic()
        if remaining <= 0:
            raise InputError("fetch_timeout", f"{target.shown()[:200]}: not fetched within "
                             f"{self.policy.fetch_timeout_s:g} s")
        timeout = urllib3.Timeout(connect=min(self.policy.connect_timeout_s, remaining),
                                  read=min(self.policy.read_timeout_s, remaining))
        pool_kwargs: dict[str, Any] = {}
        if target.scheme == "https":  # SNI and the certificate check: the name, not the address
            pool_kwargs = {"server_hostname": target.host, "assert_hostname": target.host}
        pool = self.manager.connection_from_host(address.split("%", 1)[0], target.port,
                                                 target.scheme, pool_kwargs=pool_kwargs)
        headers = {"Host": target.host_header(), "Accept-Encoding": "identity",
                   "User-Agent": "imgpipe"}
        try:
            response = pool.urlopen("GET", target.request_target, headers=headers,
                                    redirect=False, retries=False, timeout=timeout,
                                    preload_content=False, decode_content=False,
                                    assert_same_host=False)
        except Exception as exc:
            raise _translate(exc, target, self.policy) from None
        try:
            return self._response(response, target, deadline)
        except Exception as exc:
            response.close()
            if isinstance(exc, (InputError, _Transient)):
                raise
            raise _translate(exc, target, self.policy) from None
        finally:
            response.release_conn()

    def _response(self, response: Any, target: Target, deadline: float) -> bytes | str:
        status = response.status
        shown_url = target.shown()[:200]
        if status in REDIRECT_STATUSES and response.headers.get("Location"):
            response.close()  # the body of a redirect is not read
            return urljoin(f"{target.scheme}://{target.host_header()}{target.request_target}",
                           response.headers["Location"])
        if status >= 500:
            raise _Transient(InputError("http_error", f"{shown_url}: HTTP {status} "
                                        f"{response.reason or ''}".rstrip()))
        if not 200 <= status < 300:
            raise InputError("http_error", f"{shown_url}: HTTP {status} "
                             f"{response.reason or ''}".rstrip())
        limit = self.policy.max_bytes
        declared = response.headers.get("Content-Length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            raise InputError("data_too_large", f"{shown_url}: {int(declared):,} bytes; the "
                             f"limit is {limit:,} (preprocess.max_file_bytes)")
        body = bytearray()
        while True:
            if time.monotonic() > deadline:
                raise InputError("fetch_timeout", f"{shown_url}: not fetched within "
                                 f"{self.policy.fetch_timeout_s:g} s")
            chunk = response.read1(READ_BYTES, decode_content=False)  # what has come
            if not chunk:
                break
            body += chunk
            if len(body) > limit:
                raise InputError("data_too_large", f"{shown_url}: larger than the limit of "
                                 f"{limit:,} bytes (preprocess.max_file_bytes)")
        return bytes(body)


def _translate(exc: Exception, target: Target, policy: UrlPolicy) -> InputError | _Transient:
    """A urllib3 or socket failure as an InputError; _Transient when worth retrying.

    The message is made here, never from the exception's text, which may hold
    the request line (and so the query string)."""
    from urllib3 import exceptions as errors

    shown_url = target.shown()[:200]
    if isinstance(exc, errors.NewConnectionError):  # a ConnectTimeoutError subclass
        return _Transient(InputError("fetch_failed", f"{shown_url}: cannot connect"))
    if isinstance(exc, errors.ConnectTimeoutError):
        return InputError("fetch_timeout", f"{shown_url}: no connection within "
                          f"{policy.connect_timeout_s:g} s")
    if isinstance(exc, (errors.ReadTimeoutError, TimeoutError, socket.timeout)):
        return InputError("fetch_timeout", f"{shown_url}: no data for "
                          f"{policy.read_timeout_s:g} s")
    if isinstance(exc, errors.SSLError):
        return InputError("fetch_failed", f"{shown_url}: TLS failed (certificate or "
                          "handshake)")
    if isinstance(exc, (errors.ProtocolError, errors.IncompleteRead, ConnectionError)):
        return _Transient(InputError("fetch_failed", f"{shown_url}: the connection was "
                                     "reset or the body cut short"))
    return InputError("fetch_failed", f"{shown_url}: {type(exc).__name__}")
