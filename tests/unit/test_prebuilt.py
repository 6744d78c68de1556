"""Checked exports are recalled only while their artifact is whole; predictions
come out the same from NumPy and torch logits."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch

from pipeline.prebuilt import Checked, ModelCard, Refused, forget, recall, refuse, remember
from pipeline.predictions import top_k

LABELS = ["cat", "dog", "fox", "owl"]


def checked(artifact: Path) -> Checked:
    return Checked(ModelCard("m", LABELS, "d" * 32), str(artifact), artifact.stat().st_size,
                   6, 2e-6)


def test_a_check_is_recalled_while_its_artifact_is_whole(tmp_path: Path) -> None:
    artifact = tmp_path / "m.onnx"
    artifact.write_bytes(b"x" * 100)
    remember(tmp_path, "key", checked(artifact))
    assert recall(tmp_path, "key") == checked(artifact)

    artifact.write_bytes(b"x" * 50)  # cut short: run it no more
    assert recall(tmp_path, "key") is None
    artifact.unlink()
    assert recall(tmp_path, "key") is None


def test_a_refusal_is_recalled_until_forgotten(tmp_path: Path) -> None:
    refuse(tmp_path, "key", "scores unlike eager")
    assert recall(tmp_path, "key") == Refused("scores unlike eager")
    forget(tmp_path, "key")
    assert recall(tmp_path, "key") is None


def test_a_damaged_record_is_no_record(tmp_path: Path) -> None:
    (tmp_path / "checked").mkdir()
    (tmp_path / "checked" / "key.json").write_text('{"card": {"name": "m"}}')
    assert recall(tmp_path, "key") is None


def test_top_k_is_the_same_from_numpy_and_from_torch() -> None:
    logits = np.array([[0.1, 2.0, -1.0, 2.0], [3.0, 0.0, 0.5, 1.0]], dtype=np.float32)
    from_numpy = top_k(logits, 3, LABELS)
    assert from_numpy == top_k(torch.from_numpy(logits), 3, LABELS)
    # best first, ties in class order, probabilities from the softmax
    assert [p["label"] for p in from_numpy[0]] == ["dog", "owl", "cat"]
    expected = np.exp(logits[1]) / np.exp(logits[1]).sum()
    assert from_numpy[1][0] == {"label": "cat", "index": 0, "score": round(float(expected[0]), 6)}
