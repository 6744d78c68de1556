"""A model's cache scope, remembered by the identity of the files it comes from."""

from __future__ import annotations

import os
from pathlib import Path

from pipeline.cache import scopes
from pipeline.config import ModelSettings

SCOPE = scopes.ModelScope("resnet18", "w" * 32, "l" * 32)


def test_a_remembered_scope_is_recalled_by_its_key(tmp_path: Path) -> None:
    scopes.remember(tmp_path, "key", SCOPE)
    assert scopes.recall(tmp_path, "key") == SCOPE
    assert scopes.recall(tmp_path, "other") is None


def test_an_unreadable_record_is_no_scope(tmp_path: Path) -> None:
    (tmp_path / "key.json").write_text("{not json")
    assert scopes.recall(tmp_path, "key") is None
    (tmp_path / "key.json").write_text('{"model_id": "m"}')
    assert scopes.recall(tmp_path, "key") is None


def test_the_identity_changes_with_the_model_and_its_files(tmp_path: Path) -> None:
    weights, labels = tmp_path / "w.pth", tmp_path / "labels.txt"
    weights.write_bytes(b"weights")
    labels.write_text("cat\ndog\n")
    settings = ModelSettings(name="resnet18", weights=weights, labels=labels)
    first = scopes.identity(settings)
    assert scopes.identity(settings) == first
    assert scopes.identity(ModelSettings(name="resnet50", weights=weights,
                                         labels=labels)) != first
    weights.write_bytes(b"other weights")
    assert scopes.identity(settings) != first
    second = scopes.identity(settings)
    os.utime(labels, ns=(1, 1))
    assert scopes.identity(settings) != second


def test_a_torchscript_file_is_part_of_the_identity(tmp_path: Path) -> None:
    model = tmp_path / "model.pt"
    model.write_bytes(b"one")
    settings = ModelSettings(name=str(model))
    first = scopes.identity(settings)
    model.write_bytes(b"two, longer")
    assert scopes.identity(settings) != first
