"""Helpers for driving the real `imgpipe` command in a subprocess."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
import redis
import torch

from tests.builders import MeanColour
from tests.redis_server import RedisServer

IMGPIPE = [sys.executable, "-m", "workers.cli"]


# Root reads any file; without these capabilities it obeys file modes like anyone.
UNPRIVILEGED = ["setpriv", "--bounding-set", "-dac_override,-dac_read_search"]


def run_imgpipe(*args: str, timeout: float = 300, obey_file_modes: bool = False,
                env: Optional[dict[str, str]] = None) -> subprocess.CompletedProcess[str]:
    """Run `imgpipe ARGS...` to completion (as root without file-mode overrides
    when `obey_file_modes` is set, so that chmod 000 really denies reading)."""
    prefix = UNPRIVILEGED if obey_file_modes and os.geteuid() == 0 else []
    return subprocess.run(
        [*prefix, *IMGPIPE, *args], capture_output=True, text=True, timeout=timeout,
        env={**os.environ, **(env or {})}, cwd=Path(__file__).resolve().parents[2],
        errors="surrogateescape")


def start_imgpipe(*args: str) -> subprocess.Popen[str]:
    """Start `imgpipe ARGS...` in a session of its own: signals sent to its
    group reach its workers too, as Ctrl-C on a terminal does."""
    return subprocess.Popen([*IMGPIPE, *args], stdout=subprocess.DEVNULL,
                            stderr=subprocess.PIPE, text=True, errors="surrogateescape",
                            start_new_session=True, preexec_fn=_default_sigint)


def _default_sigint() -> None:
    # A suite started in the background by a shell inherits SIGINT ignored, and
    # Python keeps it so: give the command the terminal's default back.
    signal.signal(signal.SIGINT, signal.SIG_DFL)


RESULTS_HEADER = b'{"imgpipe_results"'  # a results file's first line: its settings


def count_lines(path: Path) -> int:
    """Records in a results file (its settings header is not one)."""
    try:
        with open(path, "rb") as handle:
            return sum(1 for line in handle if not line.startswith(RESULTS_HEADER))
    except FileNotFoundError:
        return 0


def wait_for_lines(path: Path, lines: int, process: subprocess.Popen[str],
                   timeout_s: float = 120) -> None:
    """Until `path` holds `lines` lines, the process ends, or time runs out."""
    deadline = time.monotonic() + timeout_s
    while count_lines(path) < lines and process.poll() is None and time.monotonic() < deadline:
        time.sleep(0.05)


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    """The records of a JSONL results file, without its settings header."""
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        return [json.loads(line) for line in handle
                if not line.encode("utf-8", "surrogateescape").startswith(RESULTS_HEADER)]


@pytest.fixture
def run() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_imgpipe


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TorchScript file, for tests about the pipeline rather than the model."""
    path = tmp_path_factory.mktemp("models") / "mean_colour.pt"
    torch.jit.script(MeanColour()).save(str(path))
    return path


@pytest.fixture
def prefix(request: pytest.FixtureRequest) -> str:
    """Redis keys of the test's own on the shared session server."""
    return f"t-{request.node.name}"


@pytest.fixture
def raw(redis_server: RedisServer) -> Iterator[redis.Redis]:
    """A plain connection to the session server, to arrange and inspect keys."""
    conn = redis.Redis.from_url(redis_server.url)
    yield conn
    conn.close()
