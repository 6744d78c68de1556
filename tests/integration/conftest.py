"""Helpers for driving the real `imgpipe` command in a subprocess."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any, Optional

import pytest
import torch

from tests.builders import MeanColour

IMGPIPE = [sys.executable, "-m", "pipeline.cli"]


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


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    with open(path, encoding="utf-8", errors="surrogateescape") as handle:
        return [json.loads(line) for line in handle]


@pytest.fixture
def run() -> Callable[..., subprocess.CompletedProcess[str]]:
    return run_imgpipe


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A TorchScript file, for tests about the pipeline rather than the model."""
    path = tmp_path_factory.mktemp("models") / "mean_colour.pt"
    torch.jit.script(MeanColour()).save(str(path))
    return path
