"""`imgpipe serve` as a service: sd_notify, the watchdog, /healthz, /readyz and /metrics.

Real daemon subprocesses, a real AF_UNIX datagram socket standing in for
systemd's notify socket, real HTTP requests to the status endpoint, and
Prometheus' own text parser for /metrics; no mocks. Waits are generous and
nothing is asserted about speed: the machine is shared.
"""

from __future__ import annotations

import http.client
import math
import re
import signal
import socket
import threading
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any, Optional

import pytest
import torch
from PIL import Image
from prometheus_client.parser import text_string_to_metric_families

from pipeline.config import RedisSettings
from pipeline.transport.client import Client
from tests.builders import MeanColour
from tests.redis_server import RedisServer, free_port
from tests.serve_daemon import DaemonFactory, ServeProcess, wait_until

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(not hasattr(socket, "AF_UNIX"), reason="needs AF_UNIX")]

WAIT_S = 120.0  # for start-up and results: generous, the machine is noisy
WATCHDOG_USEC = "1000000"  # WatchdogSec=1: a ping every 0.5 s while healthy
STATUS_LINE = re.compile(r"^\d+\.\d jobs/s, (\d+) in flight, (\d+) answered$")
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


# -- systemd's end of the notify socket -------------------------------------------

class NotifySocket:
    """A datagram socket at a path; every message is kept with its arrival time."""

    def __init__(self, path: Path) -> None:
        assert len(str(path)) < 100, f"{path} is too long for an AF_UNIX address"
        self.path = path
        self._sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self._sock.bind(str(path))
        self._sock.settimeout(0.1)
        self._lock = threading.Lock()
        self._received: list[tuple[float, list[str]]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._collect, daemon=True)
        self._thread.start()

    def _collect(self) -> None:
        while not self._closed.is_set():
            try:
                data = self._sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                self._received.append((time.monotonic(), data.decode().split("\n")))

    def received(self) -> list[tuple[float, list[str]]]:
        """(arrival time, the datagram's assignments), oldest first."""
        with self._lock:
            return list(self._received)

    def times_of(self, assignment: str, since: float = 0.0) -> list[float]:
        return [at for at, lines in self.received() if assignment in lines and at >= since]

    def statuses(self, since: float = 0.0) -> list[str]:
        return [line.removeprefix("STATUS=") for at, lines in self.received() if at >= since
                for line in lines if line.startswith("STATUS=")]

    def wait_for(self, assignment: str, timeout_s: float = WAIT_S, count: int = 1,
                 since: float = 0.0, daemon: Optional[ServeProcess] = None) -> float:
        """When the `count`th datagram holding `assignment` (after `since`) arrived."""
        wait_until(lambda: len(self.times_of(assignment, since)) >= count, timeout_s,
                   f"{count} x {assignment}", [daemon] if daemon else [])
        return self.times_of(assignment, since)[count - 1]

    def close(self) -> None:
        self._closed.set()
        self._thread.join(2.0)
        self._sock.close()


@pytest.fixture
def notify_socket(tmp_path: Path) -> Iterator[NotifySocket]:
    listener = NotifySocket(tmp_path / "notify.sock")
    yield listener
    listener.close()


# -- the status endpoint ----------------------------------------------------------

def get(port: int, path: str, timeout_s: float = 2.0) -> Optional[tuple[int, str]]:
    """(status, body) of GET http://127.0.0.1:port/path; None if nothing answered."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=timeout_s)
    try:
        conn.request("GET", path)
        response = conn.getresponse()
        return response.status, response.read().decode()
    except (OSError, http.client.HTTPException):
        return None
    finally:
        conn.close()


class ReadyzPoller:
    """GET /readyz every 20 ms from a thread, keeping (time, answer) for each reply."""

    def __init__(self, port: int) -> None:
        self.port = port
        self.answers: list[tuple[float, tuple[int, str]]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()

    def _poll(self) -> None:
        while not self._stop.wait(0.02):
            answer = get(self.port, "/readyz", timeout_s=1.0)
            if answer is not None:
                self.answers.append((time.monotonic(), answer))

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(5.0)


def scrape(port: int) -> Samples:
    """Every sample of /metrics, parsed by prometheus_client: (name, labels) -> value."""
    answer = get(port, "/metrics", timeout_s=10.0)
    assert answer is not None and answer[0] == 200, answer
    return {(sample.name, frozenset(sample.labels.items())): sample.value
            for family in text_string_to_metric_families(answer[1])
            for sample in family.samples}


def value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((name, frozenset(labels.items())), 0.0)


def labels_of(samples: Samples, name: str) -> dict[str, str]:
    found = [dict(labels) for sample, labels in samples if sample == name]
    assert len(found) == 1, (name, found)
    return found[0]


# -- helpers ----------------------------------------------------------------------

def alive(daemon: ServeProcess) -> bool:
    return daemon.process is not None and daemon.process.poll() is None


@pytest.fixture
def images(tmp_path: Path) -> Path:
    """An allowed root of a few small coloured pictures, and one pure white one."""
    root = tmp_path / "images"
    root.mkdir()
    for index, colour in enumerate([(200, 30, 30), (30, 200, 30), (30, 30, 200)]):
        Image.new("RGB", (48, 32), colour).save(root / f"{index}.png")
    Image.new("RGB", (48, 32), (255, 255, 255)).save(root / "white.png")
    return root


def coloured(root: Path) -> list[str]:
    return sorted(path.name for path in root.iterdir() if path.name != "white.png")


def serve_env(server: RedisServer, prefix: str, root: Path, model: Path,
              **settings: str) -> dict[str, str]:
    """The tiny model, one worker, no cache (every job decoded and inferred);
    `settings` as SECTION__KEY="value"."""
    env = {"IMGPIPE_REDIS_URL": server.url, "IMGPIPE_REDIS__PREFIX": prefix,
           "IMGPIPE_SERVE__ALLOWED_ROOTS": str(root), "IMGPIPE_MODEL__NAME": str(model),
           "IMGPIPE_PREPROCESS__WORKERS": "1", "IMGPIPE_CACHE__ENABLED": "false"}
    env.update({f"IMGPIPE_{key.upper()}": value for key, value in settings.items()})
    return env


def systemd_env(listener: NotifySocket) -> dict[str, str]:
    """What systemd sets for a Type=notify unit with WatchdogSec=1 (WATCHDOG_PID
    left out: the daemon's pid is not known before it starts)."""
    return {"NOTIFY_SOCKET": str(listener.path), "WATCHDOG_USEC": WATCHDOG_USEC}


def client_for(server: RedisServer, prefix: str) -> Client:
    return Client(RedisSettings(url=server.url, prefix=prefix))


def answer_all(client: Client, job_ids: list[str]) -> dict[str, dict[str, Any]]:
    results = client.wait(job_ids, stream=client.keys.results, timeout_s=WAIT_S)
    assert set(results) == set(job_ids), f"{len(job_ids) - len(results)} jobs unanswered"
    return results


# -- sd_notify --------------------------------------------------------------------

def test_ready_after_warm_up_watchdog_while_serving_status_and_stopping(
        daemon_factory: DaemonFactory, notify_socket: NotifySocket,
        redis_server: RedisServer, prefix: str, images: Path, tiny_model: Path) -> None:
    # given a daemon started the way systemd starts a Type=notify unit, /readyz
    # polled from the moment it starts
    port = free_port()
    daemon = daemon_factory({**serve_env(redis_server, prefix, images, tiny_model,
                                         METRICS__PORT=str(port)),
                             **systemd_env(notify_socket)}, start=False)
    poller = ReadyzPoller(port)
    started = time.monotonic()
    daemon.start(wait_ready=False)
    try:
        # when it says READY=1 ...
        ready_at = notify_socket.wait_for("READY=1", daemon=daemon)
        now_ready = get(port, "/readyz")
    finally:
        poller.stop()
    # ... then it was warmed up and taking jobs by then, and not before
    assert now_ready == (200, "ready")
    assert value(scrape(port), "imgpipe_model_load_seconds") > 0
    before = [answer for at, answer in poller.answers if at < ready_at]
    assert (503, "starting") in before, poller.answers[:5]
    first_ready = next((at for at, answer in poller.answers if answer == (200, "ready")),
                       math.inf)
    assert all(answer == (503, "starting") for at, answer in poller.answers if at < first_ready)
    ready_datagram = next(lines for at, lines in notify_socket.received() if "READY=1" in lines)
    assert ready_datagram[1].startswith("STATUS=serving "), ready_datagram
    print(f"READY=1 {ready_at - started:.1f} s after the start; "
          f"{len(before)} /readyz answers before it")

    # and the watchdog is pinged while idle,
    notify_socket.wait_for("WATCHDOG=1", count=3, since=ready_at, daemon=daemon)
    # and while serving a steady trickle of jobs,
    with client_for(redis_server, prefix) as client:
        serving_from, ids = time.monotonic(), []
        while time.monotonic() - serving_from < 3.0:
            ids.append(client.submit(image=coloured(images)[len(ids) % 3]))
            time.sleep(0.05)
        results = answer_all(client, ids)
        serving_until = time.monotonic()
    assert all(result["status"] == "ok" for result in results.values())
    pings = [at for at in notify_socket.times_of("WATCHDOG=1", since=serving_from)
             if at <= serving_until]
    assert len(pings) >= 2, (len(pings), serving_until - serving_from)
    print(f"{len(pings)} pings in {serving_until - serving_from:.1f} s of serving "
          f"{len(ids)} jobs")

    # and STATUS= lines describe the work: one soon reports every job answered
    wait_until(lambda: any(match and int(match[2]) == len(ids) for match in
                           map(STATUS_LINE.match, notify_socket.statuses(since=ready_at))),
               30.0, f"a STATUS= line with {len(ids)} answered", [daemon])
    statuses = notify_socket.statuses(since=ready_at)
    assert statuses[0].startswith("serving ")  # READY=1's own
    assert all(STATUS_LINE.match(line) for line in statuses[1:]), statuses
    print(f"STATUS= lines: {statuses}")

    # when SIGTERM arrives: STOPPING=1, and a clean exit
    stopped_at = time.monotonic()
    daemon.signal(signal.SIGTERM)
    notify_socket.wait_for("STOPPING=1", timeout_s=30.0, since=stopped_at)
    assert daemon.wait(60.0) == 0, daemon.log()[-3000:]
    assert notify_socket.times_of("READY=1") == [ready_at]  # once, never again


class HangsOnWhite(torch.nn.Module):
    """MeanColour, except that a (nearly) pure white image never comes back."""

    def __init__(self) -> None:
        super().__init__()
        self.scores = MeanColour()

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalised white is about 2.4 per channel; coloured pictures and the
        # all-zero warm-up batches are far below 2.
        level = x.mean(dim=(1, 2, 3)).max()
        while bool(level > 2.0):
            level = level * 1.0
        return self.scores(x)


def test_watchdog_pings_stop_while_inference_is_stuck(
        daemon_factory: DaemonFactory, notify_socket: NotifySocket,
        redis_server: RedisServer, prefix: str, images: Path, tmp_path: Path) -> None:
    # given a daemon whose model hangs on white images, with a short stall timeout
    model = tmp_path / "hangs_on_white.pt"
    torch.jit.script(HangsOnWhite()).save(str(model))
    port = free_port()
    daemon = daemon_factory({**serve_env(redis_server, prefix, images, model,
                                         SERVE__STALL_TIMEOUT_S="2", METRICS__PORT=str(port)),
                             **systemd_env(notify_socket)})
    ready_at = notify_socket.wait_for("READY=1", daemon=daemon)
    with client_for(redis_server, prefix) as client:
        ok = answer_all(client, [client.submit(image=coloured(images)[0])])
        assert next(iter(ok.values()))["status"] == "ok"  # other pictures pass
        notify_socket.wait_for("WATCHDOG=1", count=3, since=ready_at, daemon=daemon)
        # when a white image is submitted
        submitted = time.monotonic()
        client.submit(data=(images / "white.png").read_bytes())
        # then the pings stop: none for more than 3 s (WatchdogSec is 1 s) ...
        wait_until(lambda: time.monotonic() - max(notify_socket.times_of("WATCHDOG=1")) > 3.0,
                   30.0, "the watchdog pings to stop", [daemon])
    # ... while the daemon is still running, stuck, and says so on /healthz
    assert alive(daemon)
    last_ping = max(notify_socket.times_of("WATCHDOG=1"))
    print(f"last ping {last_ping - submitted:.1f} s after the white job")
    assert get(port, "/healthz", timeout_s=2.0) == (503, "stalled")
    assert "watchdog pings stop" in daemon.log()
    assert alive(daemon)  # daemon_factory kills it, and its group, at the end


# -- /metrics ---------------------------------------------------------------------

def test_metrics_scraped_and_parsed_by_prometheus_move_with_the_jobs(
        daemon_factory: DaemonFactory, redis_server: RedisServer,
        prefix: str, images: Path, tiny_model: Path) -> None:
    # given a serving daemon, scraped once
    port = free_port()
    daemon = daemon_factory(serve_env(redis_server, prefix, images, tiny_model,
                                      METRICS__PORT=str(port)))
    before = scrape(port)
    # when some good jobs and one corrupt one are answered
    good = 7
    with client_for(redis_server, prefix) as client:
        ids = [client.submit(image=coloured(images)[index % 3]) for index in range(good)]
        corrupt = client.submit(data=b"this is not an image, only text " * 64)
        results = answer_all(client, [*ids, corrupt])
    assert all(results[job_id]["status"] == "ok" for job_id in ids)
    assert results[corrupt]["status"] == "error"
    code = results[corrupt]["error"]["code"]
    assert code == "not_an_image", results[corrupt]
    # (results are published before the metrics count them: wait for the count)
    wait_until(lambda: value(scrape(port), "imgpipe_jobs_total", status="error")
               > value(before, "imgpipe_jobs_total", status="error"),
               30.0, "the metrics to count the jobs", [daemon])
    after = scrape(port)

    # then the counters moved by exactly the jobs answered
    def moved(name: str, **labels: str) -> float:
        return value(after, name, **labels) - value(before, name, **labels)

    assert moved("imgpipe_jobs_total", status="ok") == good
    assert moved("imgpipe_jobs_total", status="error") == 1
    assert moved("imgpipe_errors_total", code=code) == 1
    # and every stage a job passed through was timed
    assert moved("imgpipe_stage_seconds_count", stage="inference") == good
    assert moved("imgpipe_stage_seconds_count", stage="decode") >= good
    assert moved("imgpipe_stage_seconds_count", stage="publish") >= 1
    assert moved("imgpipe_stage_seconds_sum", stage="inference") > 0
    assert moved("imgpipe_batch_size_count") >= 1
    assert moved("imgpipe_batch_size_sum") == good  # every scored image in one batch
    # and the gauges describe the daemon
    assert value(after, "imgpipe_model_load_seconds") > 0
    assert value(after, "imgpipe_ready") == 1
    info = labels_of(after, "imgpipe_info")
    assert info["model"] == results[ids[0]]["model"], info
    assert info["device"] == "cpu" or info["device"].startswith("cuda"), info
    assert info["version"], info
    publishes = moved("imgpipe_stage_seconds_count", stage="publish")
    print(f"info {info}; {publishes:g} publish observations for {good + 1} jobs "
          f"in {moved('imgpipe_batch_size_count'):g} batches")
    assert alive(daemon)


# -- /healthz and /readyz ---------------------------------------------------------

def test_health_and_readiness_flip_from_starting_to_ready_to_draining(
        daemon_factory: DaemonFactory, redis_server_factory: Callable[[], RedisServer],
        prefix: str, images: Path, tiny_model: Path) -> None:
    # given a daemon started while its Redis is down
    server = redis_server_factory()
    server.stop()
    port = free_port()
    daemon = daemon_factory(serve_env(server, prefix, images, tiny_model,
                                      METRICS__PORT=str(port), SERVE__DRAIN_GRACE_S="120",
                                      REDIS__TIMEOUT_S="1"),
                            start=False)
    daemon.start(wait_ready=False)
    daemon.wait_for_log("unavailable", timeout_s=WAIT_S)
    # then while it waits for Redis it is alive but not ready
    assert get(port, "/healthz") == (200, "ok")
    assert get(port, "/readyz") == (503, "starting")
    assert value(scrape(port), "imgpipe_ready") == 0

    # when Redis comes up, it is ready
    server.start()
    wait_until(lambda: get(port, "/readyz") == (200, "ready"), 60.0, "/readyz 200", [daemon])
    assert get(port, "/healthz") == (200, "ok")

    # given jobs in flight, and a Redis that stops answering so that none of
    # them can be published
    with client_for(server, prefix) as client:
        client.submit_many(({"image": coloured(images)[index % 3]} for index in range(2000)),
                           chunk=1000)
        wait_until(lambda: client.status().results >= 50, WAIT_S, "50 results", [daemon])
    with server.paused():
        # when SIGTERM starts the drain
        daemon.signal(signal.SIGTERM)
        daemon.wait_for_log("finishing the jobs in flight")
        # then it is draining, not ready, ...
        wait_until(lambda: get(port, "/readyz") == (503, "draining"), 10.0,
                   "/readyz 503 draining", [daemon])
        # ... and stays so, still up, once a command has timed out on the
        # stopped Redis (the second outage it logs)
        wait_until(lambda: daemon.log().count("unavailable") >= 2, 60.0,
                   "a command to time out", [daemon])
        assert alive(daemon)
        assert get(port, "/readyz") == (503, "draining")
        assert value(scrape(port), "imgpipe_ready") == 0
    # and once Redis is back the jobs in flight are published and it exits 0
    assert daemon.wait(60.0) == 0, daemon.log()[-3000:]
    assert "stopped after answering" in daemon.log()
