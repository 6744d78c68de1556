"""Which of Redis's refusals pass by themselves (wait and retry) and which do not."""

from __future__ import annotations

import pytest
import redis

from pipeline.transport.connection import passing

PIPELINE = "Command # 2 (XACK imgpipe:jobs imgpipe 1-0) of pipeline caused error: "


@pytest.mark.parametrize("reply", [
    "NOREPLICAS Not enough good replicas to write.",
    "MASTERDOWN Link with MASTER is down and replica-serve-stale-data is set to 'no'.",
    "MISCONF Redis is configured to save RDB snapshots, but it's currently unable to persist",
    "BUSY Redis is busy running a script. You can only call SCRIPT KILL or SHUTDOWN NOSCRIPT.",
    "LOADING Redis is loading the dataset in memory",
    "OOM command not allowed when used memory > 'maxmemory'.",
    "READONLY You can't write against a read only replica.",
])
def test_a_refusal_that_passes_by_itself_is_waited_out_also_inside_a_pipeline(
        reply: str) -> None:
    assert passing(redis.ResponseError(reply))
    assert passing(redis.ResponseError(PIPELINE + reply))


@pytest.mark.parametrize("reply", [
    "BUSYGROUP Consumer Group name already exists",
    "BUSYKEY Target key name already exists.",
    "WRONGTYPE Operation against a key holding the wrong kind of value",
    "ERR no such key",
    "NOGROUP No such key 'imgpipe:jobs' or consumer group 'imgpipe'",
])
def test_a_refusal_that_waiting_cannot_fix_is_not_retried(reply: str) -> None:
    assert not passing(redis.ResponseError(reply))
    assert not passing(redis.ResponseError(PIPELINE + reply))


def test_a_denial_is_never_waited_out() -> None:
    assert not passing(redis.exceptions.NoPermissionError("NOPERM this user has no permissions"))
    assert not passing(redis.AuthenticationError("WRONGPASS invalid username-password pair"))
