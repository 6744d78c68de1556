"""The CPU default: ONNX Runtime fp32, exported on first use, checked against
eager PyTorch on photographs, started without torch afterwards, refused (eager
instead) when it scores unlike eager."""

from __future__ import annotations

import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from pipeline.prebuilt import Checked, Refused, recall
from tests.integration.conftest import IMGPIPE, read_jsonl

DEFAULT_NOTE = "(onnxruntime: the CPU default, checked against eager PyTorch on 6 photographs"
EXPORT_NOTE = "exporting it to ONNX Runtime and checking it against eager PyTorch"
REFUSED_NOTE = "(torch: eager: the ONNX export was refused (the ONNX export scores unlike eager"


def score(samples_dir: Path, out: Path, artifacts: Path, *flags: str,
          python_flags: tuple[str, ...] = ()) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, *python_flags, *IMGPIPE[1:], "score", str(samples_dir), "--no-cache",
         "--out", str(out), "--overwrite", *flags],
        capture_output=True, text=True, timeout=600,
        env={**os.environ, "IMGPIPE_MODEL__ARTIFACTS_DIR": str(artifacts)})


def top1(out: Path) -> dict[str, tuple[int, float]]:
    return {r["path"]: (r["predictions"][0]["index"], r["predictions"][0]["score"])
            for r in read_jsonl(out)}


def assert_scores_like(out: Path, expected: dict[str, tuple[int, float]]) -> None:
    scored = top1(out)
    assert scored.keys() == expected.keys()
    for path, (index, probability) in scored.items():
        assert index == expected[path][0], path
        assert abs(probability - expected[path][1]) < 1e-4, path


@pytest.fixture(scope="module")
def exported(samples_dir: Path, tmp_path_factory: pytest.TempPathFactory
             ) -> tuple[Path, subprocess.CompletedProcess[str], dict[str, tuple[int, float]]]:
    """A first run with an empty artifact store, and eager PyTorch's answers."""
    base = tmp_path_factory.mktemp("cpu-default")
    artifacts = base / "artifacts"
    first = score(samples_dir, base / "first.jsonl", artifacts)
    assert first.returncode == 0, first.stderr
    eager = score(samples_dir, base / "eager.jsonl", artifacts, "--model-backend", "torch")
    assert eager.returncode == 0, eager.stderr
    return artifacts, first, top1(base / "eager.jsonl")


def test_the_first_run_exports_checks_and_scores_like_eager(
        exported: tuple[Path, subprocess.CompletedProcess[str], dict], tmp_path: Path) -> None:
    artifacts, first, eager = exported
    # the user was told why the first start takes longer, and what was chosen
    assert EXPORT_NOTE in first.stderr
    assert DEFAULT_NOTE in first.stderr
    (record,) = (artifacts / "checked").glob("*.json")
    checked = recall(artifacts, record.stem)
    assert isinstance(checked, Checked) and checked.images == 6
    assert checked.max_score_drift < 1e-3
    # and every photograph's top-1 is eager's, with the same probability
    assert_scores_like(Path(first.args[first.args.index("--out") + 1]), eager)


def test_later_runs_start_without_torch(
        exported: tuple[Path, subprocess.CompletedProcess[str], dict], samples_dir: Path,
        tmp_path: Path) -> None:
    artifacts, _, eager = exported
    later = score(samples_dir, tmp_path / "later.jsonl", artifacts,
                  python_flags=("-X", "importtime"))
    assert later.returncode == 0, later.stderr
    imported = {line.rsplit("|", 1)[-1].strip() for line in later.stderr.splitlines()
                if line.startswith("import time:")}
    assert "onnxruntime" in imported  # the check below is not vacuous
    assert "torch" not in imported
    assert EXPORT_NOTE not in later.stderr and DEFAULT_NOTE in later.stderr
    assert_scores_like(tmp_path / "later.jsonl", eager)


def test_an_export_that_scores_unlike_eager_is_refused_once_and_eager_runs(
        exported: tuple[Path, subprocess.CompletedProcess[str], dict], samples_dir: Path,
        tmp_path: Path) -> None:
    import onnx
    from onnx import numpy_helper

    # given a stored export whose classifier weights were tampered with (it loads fine)
    artifacts = tmp_path / "artifacts"
    shutil.copytree(exported[0], artifacts)
    shutil.rmtree(artifacts / "checked")
    (artifact,) = artifacts.glob("*.onnx")
    graph = onnx.load(str(artifact))
    classifier = max(graph.graph.initializer, key=lambda t: np.prod(t.dims))
    weights = numpy_helper.to_array(classifier)
    rng = np.random.default_rng(0)
    classifier.CopyFrom(numpy_helper.from_array(
        rng.permutation(weights.reshape(weights.shape[0], -1)).reshape(weights.shape),
        classifier.name))
    onnx.save(graph, str(artifact))

    # when the default runs twice
    first = score(samples_dir, tmp_path / "first.jsonl", artifacts)
    second = score(samples_dir, tmp_path / "second.jsonl", artifacts)

    # then the export is refused with its numbers, once, and eager PyTorch scores
    assert first.returncode == 0 and second.returncode == 0, first.stderr + second.stderr
    assert "ONNX Runtime is not used for efficientnet_lite0" in first.stderr
    assert "ONNX Runtime is not used" not in second.stderr
    assert REFUSED_NOTE in first.stderr and REFUSED_NOTE in second.stderr
    (record,) = (artifacts / "checked").glob("*.json")
    assert isinstance(recall(artifacts, record.stem), Refused)
    for out in (tmp_path / "first.jsonl", tmp_path / "second.jsonl"):
        assert_scores_like(out, exported[2])


def test_a_damaged_export_is_built_again(
        exported: tuple[Path, subprocess.CompletedProcess[str], dict], samples_dir: Path,
        tmp_path: Path) -> None:
    # given a stored, checked export cut in half
    artifacts = tmp_path / "artifacts"
    shutil.copytree(exported[0], artifacts)
    (artifact,) = artifacts.glob("*.onnx")
    artifact.write_bytes(artifact.read_bytes()[: artifact.stat().st_size // 2])

    # when the default runs
    result = score(samples_dir, tmp_path / "out.jsonl", artifacts)

    # then it is exported and checked again, and scores like eager
    assert result.returncode == 0, result.stderr
    assert DEFAULT_NOTE in result.stderr
    assert_scores_like(tmp_path / "out.jsonl", exported[2])
