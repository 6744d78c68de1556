"""`import imgpipe`: the supported names, cheap to import, a layer nothing
else imports; and the Scorer's settings, checked before anything starts."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import grimp
import pytest

import imgpipe
import pipeline
from pipeline import errors
from pipeline.scorer import KEYWORDS, Scorer

ROOT = Path(__file__).resolve().parents[2]


def python(code: str) -> str:
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          cwd=ROOT, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout


def test_every_exported_name_resolves_to_the_implementation() -> None:
    from pipeline.config import Settings, load_settings
    from pipeline.transport.client import Client

    assert imgpipe.Scorer is Scorer and imgpipe.Client is Client
    assert imgpipe.load_settings is load_settings and imgpipe.Settings is Settings
    for name in ("ImgpipeError", "PermanentError", "TransientError", "InputError",
                 "ConfigError", "ModelLoadError"):
        assert getattr(imgpipe, name) is getattr(errors, name)
    assert imgpipe.__version__ == pipeline.__version__
    assert all(hasattr(imgpipe, name) for name in imgpipe.__all__)
    with pytest.raises(AttributeError, match="no attribute 'score'"):
        imgpipe.score  # noqa: B018


def test_importing_it_loads_neither_the_engine_nor_redis_nor_torch() -> None:
    loaded = python("import sys, imgpipe; print(sorted(m for m in ('torch', 'redis', "
                    "'pipeline.engine', 'pipeline.config') if m in sys.modules))")
    assert loaded.strip() == "[]"


def test_python_dash_m_imgpipe_is_the_command() -> None:
    assert python("import runpy, sys; sys.argv = ['imgpipe', '--version']\n"
                  "try:\n    runpy.run_module('imgpipe', run_name='__main__')\n"
                  "except SystemExit as exit:\n    assert exit.code == 0, exit.code"
                  ).strip() == f"imgpipe {pipeline.__version__}"


def test_neither_the_library_nor_the_entry_points_import_the_api() -> None:
    graph = grimp.build_graph("imgpipe", "pipeline", "workers",
                              exclude_type_checking_imports=True)
    for importer in ("pipeline", "workers"):
        chains = graph.find_shortest_chains(importer=importer, imported="imgpipe")
        assert not chains, f"{importer} imports imgpipe: {sorted(chains)}"


def test_keywords_are_the_score_commands_flags() -> None:
    from workers.cli import _parser

    commands = next(action for action in _parser()._actions
                    if isinstance(action, argparse._SubParsersAction))
    flags: dict[str, set[str]] = {}
    for action in commands.choices["score"]._actions:
        flags.setdefault(action.dest, set()).update(action.option_strings)
    for keyword, key in KEYWORDS.items():
        assert "--" + keyword.replace("_", "-") in flags.get(key, set()), (keyword, key)


def test_keywords_and_dotted_settings_become_the_settings() -> None:
    scorer = Scorer("efficientnet_lite0", topk=2, cache=False, workers=1, batch_size=4,
                    settings={"batching.queue_batches": 3, "preprocess.chunk_size": 2})
    cfg = scorer.settings
    assert (cfg.model.name, cfg.model.topk, cfg.cache.enabled, cfg.preprocess.workers) == (
        "efficientnet_lite0", 2, False, 1)
    assert (cfg.batching.max_batch_size, cfg.batching.queue_batches) == (4, 3)
    # two chunks per worker, the batch queue, a batch being scored and one more
    assert scorer.in_flight_limit == 2 * 1 * 2 + 4 * (3 + 2)


def test_a_config_file_is_read_beneath_the_keywords(tmp_path: Path) -> None:
    config = tmp_path / "imgpipe.toml"
    config.write_text("[model]\ntopk = 7\n[batching]\nmax_batch_size = 8\n")
    cfg = Scorer(config=config, batch_size=16).settings
    assert (cfg.model.topk, cfg.batching.max_batch_size) == (7, 16)


@pytest.mark.parametrize(("kwargs", "message"), [
    ({"topk": 0}, "model.topk"),
    ({"settings": {"batching.max_batchsize": 4}}, "max_batchsize"),
    ({"topk": 3, "settings": {"model.topk": 5}}, "model.topk is given twice"),
    ({"backend": "opencv"}, "preprocess.backend"),
])
def test_invalid_settings_raise_config_error_when_the_scorer_is_made(
        kwargs: dict, message: str) -> None:
    with pytest.raises(imgpipe.ConfigError, match=message):
        Scorer(**kwargs)
