"""sd_notify and the watchdog, received on real AF_UNIX datagram sockets."""

from __future__ import annotations

import os
import socket
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from pipeline import notify

pytestmark = pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs AF_UNIX")


@pytest.fixture
def listener(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Iterator[socket.socket]:
    """systemd's end: a datagram socket at a path, named by NOTIFY_SOCKET."""
    path = tmp_path / "notify.sock"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind(str(path))
        monkeypatch.setenv("NOTIFY_SOCKET", str(path))
        yield sock


def receive(sock: socket.socket, duration_s: float) -> list[str]:
    """Every datagram that arrives within `duration_s`."""
    messages, deadline = [], time.monotonic() + duration_s
    while (left := deadline - time.monotonic()) > 0:
        sock.settimeout(left)
        try:
            messages.append(sock.recv(4096).decode())
        except TimeoutError:
            break
    return messages


def receive_one(sock: socket.socket) -> str:
    sock.settimeout(2.0)
    return sock.recv(4096).decode()


def test_lifecycle_messages_arrive(listener: socket.socket) -> None:
    assert notify.ready("warmed up")
    assert receive_one(listener) == "READY=1\nSTATUS=warmed up"
    assert notify.status("120 img/s\nqueue 4")
    assert receive_one(listener) == "STATUS=120 img/s queue 4"  # one line, always
    assert notify.stopping()
    assert receive_one(listener) == "STOPPING=1"
    assert notify.extend_timeout(2.5)
    assert receive_one(listener) == "EXTEND_TIMEOUT_USEC=2500000"


@pytest.mark.skipif(sys.platform != "linux", reason="the abstract namespace is Linux-only")
def test_abstract_socket_name(monkeypatch: pytest.MonkeyPatch) -> None:
    name = f"imgpipe-test-{uuid.uuid4().hex}"
    with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
        sock.bind("\0" + name)
        monkeypatch.setenv("NOTIFY_SOCKET", "@" + name)
        assert notify.ready()
        assert receive_one(sock) == "READY=1"


def test_no_op_outside_systemd(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    assert not notify.ready()
    watchdog = notify.Watchdog(healthy=lambda: True)
    watchdog.start()
    watchdog.stop()


def test_gone_socket_is_logged_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert not notify.ready()
    assert "could not notify systemd" in caplog.text


def test_watchdog_pings_only_while_healthy(listener: socket.socket,
                                           monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    # given WatchdogSec=0.2 s: a ping every 0.1 s while the check passes
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    healthy = [True]
    watchdog = notify.Watchdog(healthy=lambda: healthy[0])
    watchdog.start()
    try:
        assert watchdog.interval_s == 0.2
        assert receive(listener, 0.35).count("WATCHDOG=1") >= 2

        # when progress stops: no more pings (after one that may be on its way)
        healthy[0] = False
        receive(listener, 0.15)
        assert receive(listener, 0.3) == []
        assert caplog.text.count("watchdog pings stop") == 1

        # when progress comes back: the pings resume
        healthy[0] = True
        assert "WATCHDOG=1" in receive(listener, 0.3)
        assert "watchdog pings resume" in caplog.text
    finally:
        watchdog.stop()


def test_watchdog_meant_for_another_process(listener: socket.socket,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    watchdog = notify.Watchdog(healthy=lambda: True)
    watchdog.start()
    try:
        assert watchdog.interval_s is None
        assert receive(listener, 0.2) == []
    finally:
        watchdog.stop()


def test_watchdog_posts_status(listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    # given no watchdog, only status updates every 0.05 s
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    watchdog = notify.Watchdog(healthy=lambda: True, describe=lambda: "42 img/s, queue 3",
                               status_every_s=0.05)
    watchdog.start()
    try:
        messages = receive(listener, 0.2)
    finally:
        watchdog.stop()
    assert len(messages) >= 2
    assert set(messages) == {"STATUS=42 img/s, queue 3"}


def test_heartbeat_age() -> None:
    beat = notify.Heartbeat()
    time.sleep(0.02)
    assert beat.age_s() >= 0.02
    beat.tick()
    assert beat.age_s() < 0.02


def test_watchdog_interval_from_environment() -> None:
    assert notify.watchdog_interval_s({}) is None
    assert notify.watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert notify.watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    assert notify.watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None
