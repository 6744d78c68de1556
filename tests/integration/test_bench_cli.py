"""`imgpipe bench`: every backend measured in one run, as a table or as JSON."""

from __future__ import annotations

import json
from pathlib import Path


def test_bench_measures_every_backend_and_stage(run, samples_dir: Path, tiny_model: Path,
                                                tmp_path: Path) -> None:
    result = run("bench", "--model", str(tiny_model), "--backends", "torch", "onnxruntime",
                 "--batch-sizes", "1", "4", "--seconds", "0.2", "--images", str(samples_dir),
                 "--json", env={"IMGPIPE_CACHE__DIR": str(tmp_path / "cache")})
    assert result.returncode == 0, result.stderr
    rows = json.loads(result.stdout)
    measured = {(row["stage"], row["variant"]) for row in rows if row["images_per_s"] > 0}
    assert {("model", f"{backend}, batch {size}") for backend in ("torch", "onnxruntime")
            for size in (1, 4)} <= measured
    assert {("preprocess", "pillow"), ("end to end", "torch"),
            ("end to end", "onnxruntime")} <= measured
    model_rows = [row for row in rows if row["stage"] == "model"]
    assert all(row["p50_ms"] <= row["p99_ms"] for row in model_rows)
    # DALI is measured as the engine runs it: on the model's device, a model batch a call
    [dali] = [row for row in rows if (row["stage"], row["variant"]) == ("preprocess", "dali")]
    assert dali["images_per_s"] > 0 and dali["note"].startswith("cpu, "), dali
    assert "32 images per call" in dali["note"], dali


def test_bench_prints_a_table(run, samples_dir: Path, tiny_model: Path) -> None:
    result = run("bench", "--model", str(tiny_model), "--backends", "torch", "--batch-sizes",
                 "2", "--seconds", "0.1", "--images", str(samples_dir))
    assert result.returncode == 0, result.stderr
    assert "images/s" in result.stdout and "torch, batch 2" in result.stdout
