"""What the GPU tests share: the sample photographs scored by an engine."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from pipeline.config import Settings
from pipeline.engine import Engine
from pipeline.sources.directory import walk

Scored = tuple[Any, dict[str, dict]]  # the run's summary; each record by file name


@pytest.fixture
def score_samples(samples_dir: Path) -> Callable[[Settings], Scored]:
    """Score samples/ with an engine built from the given settings."""
    def score(settings: Settings) -> Scored:
        engine = Engine(settings)
        engine.setup()
        records: list[dict] = []
        try:
            summary = engine.run(walk(str(samples_dir)), records.extend)
        finally:
            engine.close()
        return summary, {Path(r["path"]).name: r for r in records}
    return score
