"""`imgpipe submit/status/dead` as a user runs them, against a real redis-server.

No daemon runs here: these tests are about the commands' own behaviour
(arguments, errors, the private reply stream of `submit --wait`).
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
import redis

from tests.integration.conftest import IMGPIPE, run_imgpipe
from tests.redis_server import RedisServer

REPLY_STREAMS = "imgpipe:results:*"  # `submit --wait` streams under the default prefix
EVENT_TIMEOUT_S = 30.0


@pytest.fixture
def server(redis_server_factory: Callable[[], RedisServer]) -> RedisServer:
    """A server of the test's own: the default prefix is free, and its config may change."""
    return redis_server_factory()


@pytest.fixture
def conn(server: RedisServer) -> Iterator[redis.Redis]:
    made = redis.Redis.from_url(server.url)
    yield made
    made.close()


@pytest.fixture
def image(samples_dir: Path) -> str:
    return str(samples_dir / "coffee.jpg")


def assert_one_line_error(result: subprocess.CompletedProcess[str], code: int,
                          message: str) -> None:
    assert result.returncode == code, result.stderr
    assert "Traceback" not in result.stderr
    assert result.stderr.startswith("imgpipe: error: ") and message in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1, result.stderr


@pytest.mark.parametrize(("args", "message"), [
    (["dead", "retry", "bogus"], "not dead letter ids: bogus"),
    (["dead", "list", "--count", "0"], "--count must be at least 1"),
    (["dead", "list", "1-1"], "dead list takes no ids"),
    (["submit", "samples/coffee.jpg", "--topk", "0"], "--topk must be at least 1"),
    (["submit", "samples/coffee.jpg", "--wait", "--timeout", "-1"], "--timeout must be more"),
])
def test_bad_arguments_are_one_line_with_exit_2(server: RedisServer, args: list[str],
                                                message: str) -> None:
    assert_one_line_error(run_imgpipe(*args, "--redis-url", server.url), 2, message)


@pytest.mark.parametrize("args", [["status"], ["dead", "list"], ["dead", "purge"],
                                  ["submit", "samples/coffee.jpg"]])
def test_a_prefix_key_that_is_no_stream_is_one_line_with_exit_2(
        server: RedisServer, conn: redis.Redis, args: list[str]) -> None:
    conn.set("imgpipe:jobs", "another program's")
    conn.set("imgpipe:dead", "another program's")
    assert_one_line_error(run_imgpipe(*args, "--redis-url", server.url), 2,
                          "a key under the prefix 'imgpipe' is not a stream")
    assert conn.get("imgpipe:dead") == b"another program's"


def test_a_path_that_is_not_utf8_is_reported_not_sent(server: RedisServer, conn: redis.Redis,
                                                      image: str, tmp_path: Path) -> None:
    # given a file whose name is not valid UTF-8 (a path job carries text)
    odd = os.path.join(os.fsencode(tmp_path), b"caf\xe9.jpg")
    with open(odd, "wb") as handle, open(image, "rb") as source:
        handle.write(source.read())
    # when it is submitted by path beside a plain one
    result = run_imgpipe("submit", os.fsdecode(odd), image, "--paths", "--redis-url", server.url)
    # then the plain one is queued, and the other is named as not sent
    assert result.returncode == 0, result.stderr
    assert "Traceback" not in result.stderr
    assert "not sent:" in result.stderr and "not valid UTF-8" in result.stderr
    assert conn.xlen("imgpipe:jobs") == 1


def test_wait_that_times_out_deletes_its_reply_stream_which_had_a_ttl(
        server: RedisServer, conn: redis.Redis, image: str) -> None:
    # given every change to reply streams reported (keyspace events), and no daemon
    conn.config_set("notify-keyspace-events", "Kgt")
    events = conn.pubsub()
    events.psubscribe(f"__keyspace@0__:{REPLY_STREAMS}")
    confirmed = events.get_message(timeout=EVENT_TIMEOUT_S)
    assert confirmed is not None and confirmed["type"] == "psubscribe"
    # when a job is submitted and its result waited for until the timeout
    result = run_imgpipe("submit", image, "--wait", "--timeout", "1", "--redis-url", server.url)
    # then the command says so, and its reply stream had an expiry and is gone
    assert result.returncode == 1, result.stderr
    assert "1 of 1 results still missing after 1 s" in result.stderr
    seen = events_until(events, "del")
    # made with an expiry, pushed back while waiting, then deleted
    assert seen.count("expire") >= 2 and seen.index("expire") < seen.index("del")
    assert conn.keys(REPLY_STREAMS) == []
    events.close()


def test_ctrl_c_while_waiting_deletes_the_reply_stream(server: RedisServer, conn: redis.Redis,
                                                       image: str) -> None:
    # given `submit --wait` waiting (no daemon) with a long timeout
    waiting = subprocess.Popen([*IMGPIPE, "submit", image, "--wait", "--timeout", "3600",
                                "--redis-url", server.url], stderr=subprocess.PIPE, text=True,
                               start_new_session=True,
                               preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL))
    assert waiting.stderr is not None
    try:
        for line in waiting.stderr:
            if line.startswith("submitted"):
                break
        # then its reply stream exists, set to expire no sooner than the timeout
        (stream,) = conn.keys(REPLY_STREAMS)
        assert 3000 < conn.ttl(stream) <= 3600
        # when Ctrl-C arrives
        os.killpg(waiting.pid, signal.SIGINT)
        _, rest = waiting.communicate(timeout=60)
    finally:
        if waiting.poll() is None:
            waiting.kill()
    # then it exits as interrupted and the stream is gone
    assert waiting.returncode == 130, rest
    assert "Traceback" not in rest
    assert conn.keys(REPLY_STREAMS) == []


def events_until(pubsub: redis.client.PubSub, last: str) -> list[str]:
    """The keyspace events received up to and including the first `last` one."""
    seen: list[str] = []
    deadline = time.monotonic() + EVENT_TIMEOUT_S
    while last not in seen:
        if time.monotonic() > deadline:
            pytest.fail(f"no {last!r} event within {EVENT_TIMEOUT_S} s; saw {seen}")
        # None also when a subscription confirmation was read and skipped
        message = pubsub.get_message(ignore_subscribe_messages=True, timeout=1.0)
        if message is not None:
            seen.append(message["data"].decode())
    return seen
