"""systemd service notifications (sd_notify) and the watchdog, without libsystemd.

The protocol: one datagram of newline-separated VAR=value assignments, sent to
the AF_UNIX datagram socket named by $NOTIFY_SOCKET ("@name" is a name in the
abstract namespace). Without NOTIFY_SOCKET (not run by systemd, or not
`Type=notify`) every call is a no-op returning False; a failed send is logged,
never raised, because telling systemd is never worth stopping the daemon.

The unit this expects:

    [Service]
    Type=notify
    WatchdogSec=30        # systemd sets WATCHDOG_USEC; Watchdog pings every 15 s
    Restart=on-failure    # a missed watchdog is a failure
"""

from __future__ import annotations

import logging
import math
import os
import socket
import threading
import time
from collections.abc import Callable, Mapping
from typing import Optional

log = logging.getLogger("imgpipe.serve")


def notify(*assignments: str) -> bool:
    """Send VAR=value assignments in one datagram; True if it was sent."""
    address = _socket_address(os.environ.get("NOTIFY_SOCKET", ""))
    if address is None:
        return False
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as sock:
            sock.sendto("\n".join(assignments).encode(), address)
    except OSError as exc:
        log.warning("could not notify systemd: %s", exc)
        return False
    return True


def _socket_address(value: str) -> Optional[str]:
    if value.startswith("@"):
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    if value:  # e.g. "vsock:..." (systemd in a VM): not needed by imgpipe
        log.warning("NOTIFY_SOCKET=%s is not supported; only paths and @names are", value)
    return None


def ready(status_text: Optional[str] = None) -> bool:
    """Start-up is done: models warmed, taking jobs."""
    return notify("READY=1", *_status_line(status_text))


def status(text: str) -> bool:
    """The one-line status `systemctl status` shows."""
    return notify(*_status_line(text))


def stopping(status_text: Optional[str] = None) -> bool:
    """Shutdown has begun (draining)."""
    return notify("STOPPING=1", *_status_line(status_text))


def watchdog() -> bool:
    """Reset the watchdog timer (prefer `Watchdog`, which does it only while healthy)."""
    return notify("WATCHDOG=1")


def extend_timeout(seconds: float) -> bool:
    """Ask for `seconds` more before the start-up or stop timeout (slow model load, drain)."""
    return notify(f"EXTEND_TIMEOUT_USEC={int(seconds * 1_000_000)}")


def _status_line(text: Optional[str]) -> list[str]:
    # A newline would end the assignment and start a bogus one.
    return [] if text is None else ["STATUS=" + " ".join(text.splitlines())]


def watchdog_interval_s(environ: Optional[Mapping[str, str]] = None) -> Optional[float]:
    """WatchdogSec in seconds, or None if the watchdog is off or meant for another process."""
    env = os.environ if environ is None else environ
    usec, pid = env.get("WATCHDOG_USEC", ""), env.get("WATCHDOG_PID", "")
    try:
        if not usec or (pid and int(pid) != os.getpid()):
            return None
        interval_s = int(usec) / 1_000_000
    except ValueError:
        log.warning("ignoring WATCHDOG_USEC=%r / WATCHDOG_PID=%r: not integers", usec, pid)
        return None
    return interval_s if interval_s > 0 else None


class Heartbeat:
    """When a loop last made progress: `tick()` from the loop, `age_s()` from a check."""

    def __init__(self) -> None:
        self._last = time.monotonic()

    def tick(self) -> None:
        self._last = time.monotonic()

    def age_s(self) -> float:
        return time.monotonic() - self._last


class Watchdog:
    """Pings systemd's watchdog while `healthy()` holds; posts `describe()` as STATUS.

    A ping goes out every WatchdogSec/2, each only after `healthy()` returned
    True, e.g. `lambda: beat.age_s() < 60 or idle()`. When it returns False
    (or raises) the pings stop and one warning is logged: if the stall outlasts
    WatchdogSec, systemd kills the daemon and Restart= starts a fresh one. If
    it turns True again first, pings resume (and the recovery is logged): a
    stall shorter than WatchdogSec was a slow batch, not a hang.

    `healthy` and `describe` run on the watchdog's thread; they must be quick.
    """

    def __init__(self, healthy: Callable[[], bool],
                 describe: Optional[Callable[[], str]] = None,
                 status_every_s: float = 5.0) -> None:
        self._healthy = healthy
        self._describe = describe
        self._status_every_s = status_every_s
        self._stop = threading.Event()
        self._thread: Optional[threading.Thread] = None
        self._stalled = False
        self.interval_s: Optional[float] = None

    def start(self) -> None:
        """Read the environment and start pinging; nothing to do outside systemd."""
        self.interval_s = watchdog_interval_s()
        if not os.environ.get("NOTIFY_SOCKET"):
            return
        if self.interval_s is None and self._describe is None:
            return
        self._thread = threading.Thread(target=self._run, name="imgpipe-watchdog", daemon=True)
        self._thread.start()

    def stop(self, timeout_s: float = 2.0) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout_s)

    def _run(self) -> None:
        # math.inf: that duty is off, its deadline never comes.
        ping_every_s = math.inf if self.interval_s is None else self.interval_s / 2
        status_every_s = math.inf if self._describe is None else self._status_every_s
        start = time.monotonic()
        next_ping = start if ping_every_s < math.inf else math.inf
        next_status = start if status_every_s < math.inf else math.inf
        while not self._stop.is_set():
            now = time.monotonic()
            if now >= next_ping:
                self._ping()
                next_ping = now + ping_every_s
            if now >= next_status:
                self._post_status()
                next_status = now + status_every_s
            self._stop.wait(max(0.0, min(next_ping, next_status) - time.monotonic()))

    def _ping(self) -> None:
        if self._is_healthy():
            if self._stalled:
                log.warning("progress again: watchdog pings resume")
                self._stalled = False
            watchdog()
        elif not self._stalled:
            self._stalled = True
            log.warning("no progress: watchdog pings stop; systemd restarts the daemon "
                        "if this lasts %g s", self.interval_s)

    def _is_healthy(self) -> bool:
        try:
            return bool(self._healthy())
        except Exception:
            log.exception("the watchdog's health check raised; counting it as unhealthy")
            return False

    def _post_status(self) -> None:
        assert self._describe is not None
        try:
            text = self._describe()
        except Exception:
            log.exception("the status description raised")
            return
        status(text)
