"""sd_notify and the watchdog, received on real AF_UNIX datagram sockets."""

from __future__ import annotations

import os
import socket
import sys
import threading
import uuid
from collections.abc import Iterator
from pathlib import Path
from types import SimpleNamespace

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


WAIT_S = 30.0  # a failure bound only: nothing here waits for it to pass


def received(sock: socket.socket) -> list[str]:
    """Every datagram already waiting on the socket, without waiting for more."""
    messages = []
    sock.setblocking(False)
    try:
        while True:
            messages.append(sock.recv(4096).decode())
    except BlockingIOError:
        return messages
    finally:
        sock.setblocking(True)


def receive_one(sock: socket.socket) -> str:
    sock.settimeout(WAIT_S)
    return sock.recv(4096).decode()


class Calls:
    """A callback for the watchdog (a health check or a status line) that
    returns what the test says and records each answer, so a test can wait for
    the watchdog's next rounds instead of sleeping through them."""

    def __init__(self, answer: object) -> None:
        self.answer = answer
        self.answers: list[object] = []
        self._changed = threading.Condition()

    def __call__(self) -> object:
        with self._changed:
            self.answers.append(self.answer)
            self._changed.notify_all()
            return self.answer

    def switch(self, answer: object) -> int:
        """Answer `answer` from now on; how many calls were answered before."""
        with self._changed:
            self.answer = answer
            return len(self.answers)

    def wait_for(self, calls: int) -> list[object]:
        """Until `calls` calls were answered in all; the answers so far."""
        with self._changed:
            assert self._changed.wait_for(lambda: len(self.answers) >= calls, WAIT_S), \
                f"{len(self.answers)} calls of {calls} after {WAIT_S} s"
            return list(self.answers)


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
    # given no NOTIFY_SOCKET, though a watchdog interval for this very process
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    # then every notification is a no-op that says it sent nothing
    assert not notify.ready("up")
    assert not notify.status("busy")
    assert not notify.stopping()
    assert not notify.watchdog()
    assert not notify.extend_timeout(1.0)
    # and a watchdog starts no thread, so nothing ever asks for its health
    healthy, describe = Calls(True), Calls("busy")
    watchdog = notify.Watchdog(healthy=healthy, describe=describe, status_every_s=0.01)
    threads_before = set(threading.enumerate())
    watchdog.start()
    started = set(threading.enumerate()) - threads_before
    watchdog.stop()
    assert not [thread.name for thread in started if thread.name == "imgpipe-watchdog"]
    assert healthy.answers == describe.answers == []


def test_gone_socket_is_logged_not_raised(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    assert not notify.ready()
    assert "could not notify systemd" in caplog.text


def test_watchdog_pings_only_while_healthy(listener: socket.socket,
                                           monkeypatch: pytest.MonkeyPatch,
                                           caplog: pytest.LogCaptureFixture) -> None:
    # given WatchdogSec=0.2 s: a health check every 0.1 s, a ping after each that
    # passes. (A check's ping is surely sent once the next check has run: the
    # watchdog's one thread does both in turn. So whenever the latest check
    # failed, exactly one ping per passing check must have arrived.)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    healthy = Calls(True)
    watchdog = notify.Watchdog(healthy=healthy)
    watchdog.start()
    try:
        assert watchdog.interval_s == 0.2
        healthy.wait_for(3)

        # when progress stops
        passed = healthy.switch(False)
        answers = healthy.wait_for(passed + 2)
        # then the checks that passed were pinged, once each, and no other
        assert received(listener) == ["WATCHDOG=1"] * answers.count(True)
        assert caplog.text.count("watchdog pings stop") == 1
        assert "watchdog pings resume" not in caplog.text

        # when progress comes back, for one check at least
        failed = healthy.switch(True)
        healthy.wait_for(failed + 1)
        passing_again = healthy.switch(False)
        answers = healthy.wait_for(passing_again + 1)
        # then the pings resumed: one more per check that passed
        assert answers.count(True) > passed
        assert received(listener) == ["WATCHDOG=1"] * (answers.count(True) - passed)
        assert caplog.text.count("watchdog pings resume") == 1
    finally:
        watchdog.stop()


def test_watchdog_meant_for_another_process(listener: socket.socket,
                                            monkeypatch: pytest.MonkeyPatch) -> None:
    # given WATCHDOG_PID naming another process, and status lines every 0.01 s
    # (so the watchdog's thread runs, and the test sees it run)
    monkeypatch.setenv("WATCHDOG_USEC", "200000")
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    healthy, describe = Calls(True), Calls("idle")
    watchdog = notify.Watchdog(healthy=healthy, describe=describe, status_every_s=0.01)
    watchdog.start()
    try:
        assert watchdog.interval_s is None
        # when it has posted three status lines (the third asked for, the first
        # two surely sent)
        describe.wait_for(3)
    finally:
        watchdog.stop()
    # then it posted status lines only: no health check, no ping
    messages = received(listener)
    assert len(messages) >= 2 and set(messages) == {"STATUS=idle"}
    assert healthy.answers == []


def test_watchdog_posts_status(listener: socket.socket, monkeypatch: pytest.MonkeyPatch) -> None:
    # given no watchdog, only status updates every 0.05 s
    monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    healthy = Calls(True)
    watchdog = notify.Watchdog(healthy=healthy, describe=lambda: "42 img/s\nqueue 3",
                               status_every_s=0.05)
    watchdog.start()
    try:
        # then status lines keep coming, each on one line
        messages = [receive_one(listener) for _ in range(2)]
    finally:
        watchdog.stop()
    assert messages == ["STATUS=42 img/s queue 3"] * 2
    assert set(received(listener)) <= {"STATUS=42 img/s queue 3"}
    assert healthy.answers == []  # no watchdog: its health is never asked


def test_heartbeat_age(monkeypatch: pytest.MonkeyPatch) -> None:
    # given a clock the test moves
    now = [1000.0]
    monkeypatch.setattr(notify, "time", SimpleNamespace(monotonic=lambda: now[0]))
    beat = notify.Heartbeat()
    # then the age is the time since the beat was made, then since its last tick
    now[0] += 2.5
    assert beat.age_s() == 2.5
    beat.tick()
    assert beat.age_s() == 0.0
    now[0] += 0.25
    assert beat.age_s() == 0.25


def test_watchdog_interval_from_environment() -> None:
    assert notify.watchdog_interval_s({}) is None
    assert notify.watchdog_interval_s({"WATCHDOG_USEC": "30000000"}) == 30.0
    assert notify.watchdog_interval_s({"WATCHDOG_USEC": "0"}) is None
    assert notify.watchdog_interval_s({"WATCHDOG_USEC": "soon"}) is None
