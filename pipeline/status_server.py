"""The daemon's HTTP status endpoints, served from a background thread.

    GET /metrics   Prometheus exposition of `Metrics.registry` (text or OpenMetrics,
                   as the scraper's Accept header asks)
    GET /healthz   200 "ok" while alive; 503 "stalled" when the liveness check fails
    GET /readyz    200 "ready" after warm-up; 503 "starting" or "draining" otherwise

Bind address: the default is 127.0.0.1. These endpoints have no authentication
and the daemon runs on shared GPU hosts, so exposing them is a deliberate
choice: set the host to 0.0.0.0 (or the scrape interface's address) where
Prometheus or a kubelet probes from outside the machine or container.
"""

from __future__ import annotations

import logging
import socket
import socketserver
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Optional
from urllib.parse import urlsplit

from prometheus_client.exposition import choose_encoder

from pipeline.config import MetricsSettings
from pipeline.errors import ConfigError
from pipeline.metrics import Metrics

log = logging.getLogger("imgpipe.serve")

DEFAULT_HOST = "127.0.0.1"
POLL_INTERVAL_S = 0.1
REQUEST_TIMEOUT_S = 5.0  # a stuck client must not hold a server thread forever

STARTING, READY, DRAINING = "starting", "ready", "draining"


class Health:
    """Readiness (starting -> ready -> draining) and an optional liveness check.

    Draining is final: a `ready()` after `draining()` is ignored, so a late
    warm-up callback cannot put a stopping daemon back into the load balancer.
    `alive`, if given, is asked on each /healthz (e.g. "the inference loop
    ticked recently"); it must be quick, and raising counts as not alive.
    """

    def __init__(self, alive: Optional[Callable[[], bool]] = None) -> None:
        self._lock = threading.Lock()
        self._state = STARTING
        self._alive = alive

    def ready(self) -> None:
        with self._lock:
            if self._state == STARTING:
                self._state = READY

    def draining(self) -> None:
        with self._lock:
            self._state = DRAINING

    @property
    def state(self) -> str:
        return self._state

    @property
    def is_ready(self) -> bool:
        return self._state == READY

    @property
    def is_alive(self) -> bool:
        try:
            return self._alive is None or bool(self._alive())
        except Exception:
            log.exception("the liveness check raised; reporting the daemon as stalled")
            return False


class StatusServer:
    """A running server; `port` is the bound one (useful with port 0)."""

    def __init__(self, httpd: ThreadingHTTPServer, thread: threading.Thread) -> None:
        self._httpd = httpd
        self._thread = thread
        address = httpd.server_address
        self.host, self.port = str(address[0]), int(address[1])

    @property
    def url(self) -> str:
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"http://{host}:{self.port}"

    def stop(self, timeout_s: float = 5.0) -> None:
        """Stop serving and close the socket; requests in progress may be cut."""
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout_s)


def start(host: str, port: int, metrics: Metrics, health: Health) -> StatusServer:
    """Serve /metrics, /healthz and /readyz on (host, port) from a daemon thread.

    Port 0 takes a free port (see `StatusServer.port`). The `imgpipe_ready`
    gauge follows `health` from here on. Raises OSError if the address is taken.
    """
    metrics.follow_ready(lambda: health.is_ready)
    handler = type("Handler", (_Handler,), {"metrics": metrics, "health": health})
    httpd = _Server((host, port), handler)
    # A short poll interval: stop() waits up to one of them.
    thread = threading.Thread(target=httpd.serve_forever, args=(POLL_INTERVAL_S,),
                              name="imgpipe-status-http", daemon=True)
    thread.start()
    return StatusServer(httpd, thread)


def start_configured(cfg: MetricsSettings, metrics: Metrics,
                     health: Health) -> Optional[StatusServer]:
    """`start` on the configured address; None when the port is 0 (off)."""
    if cfg.port == 0:
        return None
    try:
        endpoint = start(cfg.host, cfg.port, metrics, health)
    except OSError as exc:
        raise ConfigError(f"cannot serve metrics on {cfg.host}:{cfg.port} ({exc.strerror}); "
                          "set metrics.port (one per process on a host, 0 = off)") from exc
    log.info("metrics and health on %s", endpoint.url)
    return endpoint


class _Server(ThreadingHTTPServer):
    daemon_threads = True  # never wait for a scrape at exit
    block_on_close = False

    def __init__(self, address: tuple[str, int], handler: type[BaseHTTPRequestHandler]) -> None:
        if ":" in address[0]:
            self.address_family = socket.AF_INET6
        super().__init__(address, handler)

    def server_bind(self) -> None:
        # HTTPServer.server_bind also resolves the host's FQDN, a DNS lookup
        # that can stall start-up for seconds; the name is never used here.
        socketserver.TCPServer.server_bind(self)
        self.server_name, self.server_port = str(self.server_address[0]), self.server_address[1]

    def handle_error(self, request: object, client_address: object) -> None:
        # The default prints a traceback to stderr; a scraper hanging up is routine.
        log.debug("status request from %s failed", client_address, exc_info=True)


class _Handler(BaseHTTPRequestHandler):
    metrics: Metrics
    health: Health
    timeout = REQUEST_TIMEOUT_S
    protocol_version = "HTTP/1.1"  # keep-alive for scrapers; every reply has a length

    def do_GET(self) -> None:
        self._respond(send_body=True)

    def do_HEAD(self) -> None:
        self._respond(send_body=False)

    def _respond(self, send_body: bool) -> None:
        path = urlsplit(self.path).path
        if path == "/metrics":
            encode, content_type = choose_encoder(self.headers.get("Accept", ""))
            status, body = 200, encode(self.metrics.registry)
        elif path == "/healthz":
            status, body, content_type = *_health(self.health), "text/plain; charset=utf-8"
        elif path == "/readyz":
            status, body, content_type = *_readiness(self.health), "text/plain; charset=utf-8"
        else:
            status, body, content_type = 404, b"not found", "text/plain; charset=utf-8"
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        self.send_header("Cache-Control", "no-store")
        self.end_headers()
        if send_body:
            self.wfile.write(body)

    def log_message(self, format: str, *args: object) -> None:
        pass  # no request lines on stderr: probes come every few seconds


def _health(health: Health) -> tuple[int, bytes]:
    return (200, b"ok") if health.is_alive else (503, b"stalled")


def _readiness(health: Health) -> tuple[int, bytes]:
    state = health.state
    return (200 if state == READY else 503), state.encode()
