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

    # then every variant is measured or refused with its reason ...
    assert result.returncode == 0, result.stderr
    rows = {line.split()[0]: line for line in result.stdout.splitlines()[:-1]}
    assert set(rows) == {"torch", "torch:bf16", "torch-compile", "torch-compile:bf16",
                         "torchscript", "onnxruntime", "onnxruntime:int8"}, result.stdout
    assert "refused: cannot run here: torch.compile cannot trace" in rows["torch-compile"]
    for fp32 in ("torch", "torchscript", "onnxruntime"):
        assert "top-1 agreement 100.00% on 6 images" in rows[fp32], rows[fp32]
    assert "on 6 images" in rows["onnxruntime:int8"]  # all of them calibrate it: too few

    # ... the fastest accepted one is chosen and written down ...
    chosen = result.stdout.split("chosen: ")[1].split()[0]
    assert rows[chosen].endswith(": ok")
    (profile_file,) = (cache / "profiles").glob("*.json")
    profile = json.loads(profile_file.read_text())
    assert f"{profile['backend']}:{profile['precision']}".removesuffix(":fp32") == chosen
    assert profile["measured"]["images"] == 6

    # ... and score (model.backend = auto) runs the chosen one
    scored = run("score", str(samples_dir), "--model", str(tiny_model), "--cache-dir",
                 str(cache))
    assert scored.returncode == 0, scored.stderr
    assert f"({chosen}: chosen by imgpipe optimize)" in scored.stderr


def test_when_no_variant_qualifies_nothing_is_written(run, samples_dir: Path,
                                                     tiny_model: Path, tmp_path: Path) -> None:
    cache = tmp_path / "cache"
    result = run("optimize", "--model", str(tiny_model), "--images", str(samples_dir),
                 "--backends", "torch", "--latency-ms", "0.0001", "--seconds", "0.2",
                 "--cache-dir", str(cache))
    assert result.returncode == 1
    assert "refused: batch-of-one p50" in result.stdout
    assert not (cache / "profiles").exists()
