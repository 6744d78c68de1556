"""`imgpipe serve` in a subprocess, for tests: start, wait until ready, signal, kill.

A pytest plugin (tests/conftest.py's pytest_plugins): every test may ask for
the `daemon_factory` fixture; import only the helpers and types.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Optional

import pytest

ROOT = Path(__file__).resolve().parent.parent
READY_LINE = "serving "
# Several daemons run at once in a test: no fixed metrics port unless asked for.
METRICS_OFF = {"IMGPIPE_METRICS__PORT": "0"}
START_TIMEOUT_S = 120.0
POLL_S = 0.02


class ServeProcess:
    """One daemon; settings come as IMGPIPE_* environment variables."""

    def __init__(self, env: dict[str, str], log_path: Path, *args: str) -> None:
        self.env = env
        self.log_path = log_path
        self.args = args
        self.process: Optional[subprocess.Popen[bytes]] = None

    def start(self, wait_ready: bool = True) -> ServeProcess:
        with open(self.log_path, "ab") as log:
            self.process = subprocess.Popen(
                [sys.executable, "-m", "workers.cli", "serve", *self.args],
                stdout=log, stderr=subprocess.STDOUT, cwd=ROOT,
                env={**os.environ, **METRICS_OFF, **self.env}, start_new_session=True)
        if wait_ready:
            self.wait_for_log(READY_LINE, START_TIMEOUT_S)
        return self

    def wait_for_log(self, text: str, timeout_s: float = 30.0, count: int = 1) -> None:
        """Until the log holds `text` `count` times; fail if the daemon exits first."""
        wait_until(lambda: self.log().count(text) >= count, timeout_s,
                   f"the log line {text!r}", [self])

    def log(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    @property
    def pid(self) -> int:
        assert self.process is not None
        return self.process.pid

    def signal(self, signum: int) -> None:
        assert self.process is not None
        self.process.send_signal(signum)

    def wait(self, timeout_s: float = 60.0) -> int:
        assert self.process is not None
        return self.process.wait(timeout=timeout_s)

    def stop(self, timeout_s: float = 60.0) -> int:
        """SIGTERM and wait: the exit status."""
        if self.process is None or self.process.poll() is not None:
            return self.process.returncode if self.process else 0
        self.signal(signal.SIGTERM)
        return self.wait(timeout_s)

    def kill(self) -> None:
        """SIGKILL the daemon's main process only (its workers must notice and leave)."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait(timeout=10)

    def close(self) -> None:
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


DaemonFactory = Callable[..., ServeProcess]


def wait_until(condition: Callable[[], bool], timeout_s: float,
               what: str | Callable[[], str], watch: Sequence[ServeProcess] = ()) -> None:
    """Poll `condition`; fail after `timeout_s`, or at once if a `watch`ed daemon exits.
    `what` names what is awaited (a callable is asked only when failing)."""
    deadline = time.monotonic() + timeout_s
    while not condition():
        for daemon in watch:
            assert daemon.process is not None
            if daemon.process.poll() is not None:
                pytest.fail(f"the daemon exited ({daemon.process.returncode}) while waiting "
                            f"for {_described(what)}:\n{daemon.log()[-3000:]}")
        if time.monotonic() > deadline:
            tails = "".join(f":\n{daemon.log()[-3000:]}" for daemon in watch)
            pytest.fail(f"timed out after {timeout_s} s waiting for {_described(what)}{tails}")
        time.sleep(POLL_S)


def _described(what: str | Callable[[], str]) -> str:
    return what() if callable(what) else what


@pytest.fixture
def daemon_factory(tmp_path: Path) -> Iterator[DaemonFactory]:
    """make(env, *args, start=True): a daemon with those IMGPIPE_* settings; all
    killed (with their process groups) after the test."""
    daemons: list[ServeProcess] = []

    def make(env: dict[str, str], *args: str, start: bool = True) -> ServeProcess:
        daemon = ServeProcess(env, tmp_path / f"serve-{len(daemons)}.log", *args)
        daemons.append(daemon)
        return daemon.start() if start else daemon

    yield make
    for daemon in daemons:
        daemon.close()
