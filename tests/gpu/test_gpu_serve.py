"""`imgpipe serve` on cuda: jobs through a real Redis, answered on the GPU.

The default model in a real daemon on `cuda:0`, a redis-server the suite
starts; path and inline jobs and a bad one, as a client sends them.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from pipeline.config import RedisSettings
from pipeline.transport.client import Client
from tests.redis_server import RedisServer
from tests.serve_daemon import DaemonFactory

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(),
                                                  reason="needs a CUDA device")]
PREFIX = "gpu-serve"


def test_serve_on_cuda_answers_path_inline_and_bad_jobs(
        daemon_factory: DaemonFactory, redis_server: RedisServer, samples_dir: Path) -> None:
    # given a daemon serving the default model on the GPU
    daemon = daemon_factory({
        "IMGPIPE_REDIS_URL": redis_server.url, "IMGPIPE_REDIS__PREFIX": PREFIX,
        "IMGPIPE_SERVE__ALLOWED_ROOTS": str(samples_dir), "IMGPIPE_MODEL__DEVICE": "cuda:0",
        "IMGPIPE_CACHE__ENABLED": "false"})
    assert "on cuda:0" in daemon.log(), daemon.log()[-2000:]
    # when every sample is sent by path, one inline, and one file that is no image
    paths = sorted(samples_dir.glob("*.jpg"))
    coffee = (samples_dir / "coffee.jpg").read_bytes()
    with Client(RedisSettings(url=redis_server.url, prefix=PREFIX)) as client:
        reply = client.reply_stream()
        by_path = {client.submit(image=str(path), reply_to=reply): path.name for path in paths}
        inline = client.submit(data=coffee, reply_to=reply)
        bad = client.submit(data=b"not an image at all", reply_to=reply)
        results = client.wait([*by_path, inline, bad], stream=reply, timeout_s=120)
    # then each is answered: the photos scored on the GPU as on any device, the
    # bad one with an error naming its cause, and the daemon stops cleanly
    assert set(results) == {*by_path, inline, bad}
    top1 = {by_path[job_id]: results[job_id]["predictions"][0]["label"] for job_id in by_path}
    assert top1["coffee.jpg"] == "espresso"
    assert results[inline]["predictions"][0]["label"] == "espresso"
    assert results[bad]["status"] == "error" and results[bad]["error"]["code"]
    assert all(results[job_id]["status"] == "ok" for job_id in by_path)
    assert daemon.stop() == 0, daemon.log()[-2000:]
