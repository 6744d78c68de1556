"""A real HTTP server on loopback, for URL jobs: each path answers as a test says.

`Origin` runs http.server in a thread; `routes` maps a path (query string
left off) to a function that writes the whole response. Helpers below make
the usual ones: a body, a slow or trickling one, a cut-short one, a redirect,
failures before success. Every request is counted (`hits`) and its Host
header and request line kept, so a test can tell what reached the server.
"""

from __future__ import annotations

import contextlib
import http.server
import ssl
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Optional

from tests.redis_server import TlsFiles

Respond = Callable[[http.server.BaseHTTPRequestHandler], None]


class Origin:
    """With `tls` (certificate and key files) it speaks https only."""

    def __init__(self, tls: Optional[tuple[Path, Path]] = None) -> None:
        self.routes: dict[str, Respond] = {}
        self.hits: Counter[str] = Counter()
        self.hosts: list[str] = []
        self.request_lines: list[str] = []
        origin = self

        class Handler(http.server.BaseHTTPRequestHandler):
            def do_GET(self) -> None:  # noqa: N802 (http.server's name)
                path = self.path.split("?", 1)[0]
                origin.hits[path] += 1
                origin.hosts.append(self.headers.get("Host", ""))
                origin.request_lines.append(self.requestline)
                respond = origin.routes.get(path)
                if respond is None:
                    self.send_error(404)
                    return
                with contextlib.suppress(OSError):  # the client gave up (a timeout test)
                    respond(self)

            def log_message(self, format: str, *args: object) -> None:
                pass

        self.server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.server.handle_error = lambda request, address: None  # type: ignore[method-assign]
        self.scheme = "http"
        if tls is not None:
            context = ssl.SSLContext(ssl.PROTOCOL_TLS_SERVER)
            context.load_cert_chain(*tls)
            self.server.socket = context.wrap_socket(self.server.socket, server_side=True)
            self.scheme = "https"
        self.port = self.server.server_address[1]
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)

    def url(self, path: str) -> str:
        return f"{self.scheme}://127.0.0.1:{self.port}{path}"

    def start(self) -> Origin:
        self.thread.start()
        return self

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def certificate_for(name: str, directory: Path) -> tuple[Path, Path, Path]:
    """A private CA, and a server certificate it signed for the DNS name `name`
    only: (CA, certificate, key) PEM files (the test is skipped without openssl)."""
    tls = TlsFiles.make(directory, name)
    return tls.ca, tls.cert, tls.key


@contextlib.contextmanager
def running_origin(tls: Optional[tuple[Path, Path]] = None) -> Iterator[Origin]:
    """A fresh server on a free loopback port, stopped afterwards (a test
    module's `origin` fixture)."""
    made = Origin(tls).start()
    try:
        yield made
    finally:
        made.close()


def body(data: bytes, status: int = 200, length: bool = True) -> Respond:
    """`data` with `status`; without `length` no Content-Length (the end is the close)."""
    def respond(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        if length:
            handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        handler.wfile.write(data)
    return respond


def slow(delay_s: float, data: bytes = b"late") -> Respond:
    """Nothing at all for `delay_s`, then `data`."""
    def respond(handler: http.server.BaseHTTPRequestHandler) -> None:
        time.sleep(delay_s)
        body(data)(handler)
    return respond


def trickle(data: bytes, every_s: float) -> Respond:
    """Headers at once, then one byte of `data` every `every_s`."""
    def respond(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(len(data)))
        handler.end_headers()
        for byte in data:
            handler.wfile.write(bytes([byte]))
            handler.wfile.flush()
            time.sleep(every_s)
    return respond


def truncated(declared: int, sent: bytes) -> Respond:
    """Content-Length `declared`, then only `sent`, then the connection closes."""
    def respond(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(200)
        handler.send_header("Content-Length", str(declared))
        handler.end_headers()
        handler.wfile.write(sent)
        handler.close_connection = True
    return respond


def redirect(location: str, status: int = 302) -> Respond:
    def respond(handler: http.server.BaseHTTPRequestHandler) -> None:
        handler.send_response(status)
        handler.send_header("Location", location)
        handler.send_header("Content-Length", "0")
        handler.end_headers()
    return respond


def failing_first(failures: int, then: Respond, status: int = 500) -> Respond:
    """`status` for the first `failures` requests, then `then`."""
    count = [0]

    def respond(handler: http.server.BaseHTTPRequestHandler) -> None:
        count[0] += 1
        if count[0] <= failures:
            body(b"try again", status)(handler)
        else:
            then(handler)
    return respond
