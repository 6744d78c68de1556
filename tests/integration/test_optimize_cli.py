"""`imgpipe optimize`: validated, measured, chosen; score then uses the choice."""

from __future__ import annotations

import json
from pathlib import Path


def test_optimize_chooses_a_validated_backend_that_score_then_uses(
        run, samples_dir: Path, tiny_model: Path, tmp_path: Path) -> None:
    # given an empty cache directory
    cache = tmp_path / "cache"

    # when optimize runs over the sample photos
    result = run("optimize", "--model", str(tiny_model), "--images", str(samples_dir),
                 "--seconds", "0.3", "--cache-dir", str(cache))

    # then both variants agree with eager fp32, one is chosen and written down ...
    assert result.returncode == 0, result.stderr
    assert result.stdout.count("top-1 agreement 100.00%") == 2, result.stdout
    chosen = result.stdout.split("chosen: ")[1].split()[0]
    assert chosen in ("torch", "onnxruntime")
    (profile_file,) = (cache / "profiles").glob("*.json")
    profile = json.loads(profile_file.read_text())
    assert profile["backend"] == chosen and profile["validation_images"] == 6

    # ... and score (model.backend = auto) runs the chosen one
    scored = run("score", str(samples_dir), "--model", str(tiny_model), "--cache-dir",
                 str(cache))
    assert scored.returncode == 0, scored.stderr
    assert f"({chosen})" in scored.stderr


def test_when_no_variant_qualifies_nothing_is_written(run, samples_dir: Path,
                                                     tiny_model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = run("optimize", "--model", str(tiny_model), "--images", str(samples_dir),
                 "--backends", "torch", "--latency-ms", "0.0001", "--seconds", "0.2",
                 "--cache-dir", str(cache))
    assert result.returncode == 1
    assert "refused: batch-of-one p50" in result.stdout
    assert not (cache / "profiles").exists()
