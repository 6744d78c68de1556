"""Shared fixtures: the sample photographs, a GPU skip, and the fixture plugins."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path

import pytest

# Fixture modules, registered as plugins: every test may ask for their fixtures
# (redis_server, redis_server_factory, daemon_factory, sentinel_set) without
# importing them.
pytest_plugins = ["tests.redis_server", "tests.serve_daemon", "tests.redis_sentinel"]

ROOT = Path(__file__).resolve().parent.parent
SAMPLES = ROOT / "samples"


@pytest.fixture(scope="session")
def samples_dir() -> Path:
    return SAMPLES


def pytest_configure(config: pytest.Config) -> None:
    """Keep the test suite's cache out of the user's ~/.cache (subprocesses inherit it)."""
    os.environ["IMGPIPE_CACHE__DIR"] = tempfile.mkdtemp(prefix="imgpipe-test-cache-")
    # One export of each model for the whole session, whatever cache dir a test uses.
    os.environ["IMGPIPE_MODEL__ARTIFACTS_DIR"] = os.path.join(os.environ["IMGPIPE_CACHE__DIR"],
                                                              "artifacts")


def pytest_unconfigure(config: pytest.Config) -> None:
    os.environ.pop("IMGPIPE_MODEL__ARTIFACTS_DIR", None)
    shutil.rmtree(os.environ.pop("IMGPIPE_CACHE__DIR", ""), ignore_errors=True)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Skip tests marked `gpu` when PyTorch sees no CUDA device."""
    if not any(item.get_closest_marker("gpu") for item in items):
        return
    import torch

    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if item.get_closest_marker("gpu"):
            item.add_marker(skip)
