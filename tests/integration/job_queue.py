"""A job queue as `imgpipe serve` keeps it in Redis, to check that cache
maintenance leaves it alone."""

from __future__ import annotations

import redis

from pipeline.transport.contract import Keys

GROUP = "imgpipe"
DELIVERED = 5


def add_job_queue(raw: redis.Redis, prefix: str, jobs: int = 50) -> None:
    """Jobs in a consumer group (some delivered, so pending), a result and a
    dead letter, under `prefix`."""
    keys = Keys(prefix)
    for number in range(jobs):
        raw.xadd(keys.jobs, {"id": f"job-{number}", "image": f"/srv/{number}.jpg"})
    raw.xgroup_create(keys.jobs, GROUP, id="0")
    raw.xreadgroup(GROUP, "host-1", {keys.jobs: ">"}, count=DELIVERED)
    raw.xadd(keys.results, {"job_id": "job-0", "status": "ok"})
    raw.xadd(keys.dead, {"id": "job-x", "error": "{}"})


def assert_job_queue_intact(raw: redis.Redis, prefix: str, jobs: int = 50) -> None:
    keys = Keys(prefix)
    assert raw.xlen(keys.jobs) == jobs
    (group,) = raw.xinfo_groups(keys.jobs)
    assert (group["name"], group["pending"]) == (GROUP.encode(), DELIVERED)
    assert raw.xlen(keys.results) == 1 and raw.xlen(keys.dead) == 1
