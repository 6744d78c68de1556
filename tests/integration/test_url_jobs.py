"""URL jobs end to end: a real `imgpipe serve` fetching from a real HTTP server
on loopback, and `imgpipe submit --urls`.

The daemon runs the tiny model on plain-colour images, with the local cache
on, `serve.allow_private_urls` (the server is on 127.0.0.1) and short fetch
timeouts.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from pipeline.config import RedisSettings
from pipeline.transport.client import Client
from tests.http_origin import Origin, body, failing_first, redirect, running_origin, slow
from tests.integration.conftest import IMGPIPE, run_imgpipe
from tests.integration.test_serve_faults import serve_env
from tests.redis_server import RedisServer
from tests.serve_daemon import DaemonFactory, ServeProcess

pytestmark = pytest.mark.slow

SECRET = "X-Amz-Signature=feedc0ffee"


def png(colour: tuple[int, int, int]) -> bytes:
    out = io.BytesIO()
    Image.new("RGB", (64, 48), colour).save(out, "PNG")
    return out.getvalue()


RED, BLUE = png((220, 30, 30)), png((30, 30, 220))


@pytest.fixture
def origin() -> Iterator[Origin]:
    with running_origin() as made:
        made.routes.update({
            "/img/red.png": body(RED), "/img/blue.png": body(BLUE),
            "/img/red-again.png": body(RED),
            "/img/flaky.png": failing_first(1, body(BLUE)),
            "/img/slow.png": slow(15.0, RED),
            "/img/moved.png": redirect("/img/blue.png"),
            "/img/away.png": redirect("/private/red.png"),
            "/private/red.png": body(RED),
        })
        yield made


@pytest.fixture
def daemon(daemon_factory: DaemonFactory, redis_server: RedisServer, prefix: str,
           tmp_path: Path, tiny_model: Path, origin: Origin) -> ServeProcess:
    return daemon_factory(serve_env(
        redis_server, prefix, tmp_path, tiny_model, CACHE__ENABLED="true",
        CACHE__DIR=str(tmp_path / "cache"),
        SERVE__ALLOWED_URL_PREFIXES=origin.url("/img/"), SERVE__ALLOW_PRIVATE_URLS="true",
        SERVE__URL_READ_TIMEOUT_S="2", SERVE__URL_FETCH_TIMEOUT_S="10"))


@pytest.fixture
def client(redis_server: RedisServer, prefix: str) -> Iterator[Client]:
    with Client(RedisSettings(url=redis_server.url, prefix=prefix)) as made:
        yield made


def ask_all(client: Client, urls: dict[str, str]) -> dict[str, dict[str, Any]]:
    """Submit every URL at once (job id: its key) and wait for all the results."""
    reply = client.reply_stream()
    for job_id, url in urls.items():
        client.submit(url=url, job_id=job_id, reply_to=reply)
    results = client.wait(list(urls), stream=reply, timeout_s=60)
    client.delete_stream(reply)
    assert set(results) == set(urls), results
    return results


def outcome(result: dict[str, Any]) -> str:
    if result["status"] == "ok":
        return f"ok {result['predictions'][0]['index']}"
    return str(result["error"]["code"])


def test_url_jobs_are_fetched_scored_and_their_failures_answered(
        daemon: ServeProcess, client: Client, origin: Origin) -> None:
    # given a mix of good and bad URL jobs, all queued at once (one chunk)
    results = ask_all(client, {
        "red": origin.url(f"/img/red.png?{SECRET}"), "blue": origin.url("/img/blue.png"),
        "flaky": origin.url("/img/flaky.png"), "moved": origin.url("/img/moved.png"),
        "missing": origin.url("/img/missing.png"), "slow": origin.url("/img/slow.png"),
        "away": origin.url("/img/away.png"), "outside": origin.url("/private/red.png"),
        "ftp": "ftp://127.0.0.1/img/red.png",
    })
    # then each got its own result: the good ones scored (a retry, a redirect
    # followed), the bad ones each with their code
    codes = {job_id: outcome(result) for job_id, result in results.items()}
    red, blue = codes["red"], codes["blue"]
    assert red.startswith("ok") and blue.startswith("ok") and red != blue
    assert codes == {"red": red, "blue": blue, "flaky": blue, "moved": blue,
                     "missing": "http_error", "slow": "fetch_timeout",
                     "away": "url_not_allowed", "outside": "url_not_allowed",
                     "ftp": "url_not_allowed"}
    assert "404" in results["missing"]["error"]["message"]
    assert origin.hits["/private/red.png"] == 0
    # and the signature was never logged
    assert SECRET not in daemon.log()


def test_the_result_cache_knows_url_jobs_by_their_content(
        daemon: ServeProcess, client: Client, origin: Origin) -> None:
    first = ask_all(client, {"first": origin.url("/img/red.png")})["first"]
    # when another URL serves the same bytes
    again = ask_all(client, {"again": origin.url("/img/red-again.png?v=2")})["again"]
    # then the model's answer comes from the cache (by content, not by URL)
    assert first["cache"] == "miss" and again["cache"] == "result:local"
    assert again["predictions"] == first["predictions"]
    assert origin.hits["/img/red-again.png"] == 1  # still fetched: the content is the key


def test_submit_urls_sends_url_jobs_from_a_file_or_stdin(
        daemon: ServeProcess, redis_server: RedisServer, prefix: str, origin: Origin,
        tmp_path: Path) -> None:
    # given a list with a good URL, a missing one, a blank line and a line that is no URL
    listed = tmp_path / "urls.txt"
    listed.write_text(f"{origin.url('/img/red.png')}?{SECRET}\n\n"
                      f"{origin.url('/img/missing.png')}\r\nnot a url\n")
    common = ["--redis-url", redis_server.url, "--wait", "--json", "--timeout", "60"]
    env = {"IMGPIPE_REDIS__PREFIX": prefix}
    # when it is submitted
    done = run_imgpipe("submit", "--urls", str(listed), *common, env=env)
    # then the two URLs were sent and answered, the bad line reported and not sent
    assert done.returncode == 0, done.stderr
    assert "not sent: " in done.stderr and "line 4" in done.stderr
    assert "submitted 2 jobs" in done.stderr
    results = {r["job_id"]: r for r in map(json.loads, done.stdout.splitlines())}
    assert set(results) == {origin.url("/img/red.png"), origin.url("/img/missing.png")}
    assert results[origin.url("/img/red.png")]["status"] == "ok", results
    assert results[origin.url("/img/missing.png")]["error"]["code"] == "http_error"
    assert SECRET not in done.stdout + done.stderr  # the job id leaves the query off
    # and from standard input, alone
    piped = subprocess.run([*IMGPIPE, "submit", "--urls", "-", *common],
                           input=origin.url("/img/blue.png") + "\n", capture_output=True,
                           text=True, timeout=120, env={**os.environ, **env},
                           cwd=Path(__file__).resolve().parents[2])
    assert piped.returncode == 0, piped.stderr
    assert "submitted 1 jobs" in piped.stderr
    assert json.loads(piped.stdout)["status"] == "ok"


def test_submit_needs_inputs_or_urls(redis_server: RedisServer) -> None:
    done = run_imgpipe("submit", "--redis-url", redis_server.url)
    assert done.returncode == 2 and "--urls" in done.stderr
