"""An on-disk store of compiled or exported models, one file per `ArtifactKey`.

An artifact is whatever a backend builds from a model before it can run it
(an ONNX graph, an int8 ONNX graph, a frozen TorchScript module). Building is slow,
so the file is kept and reused across restarts, keyed by everything that
determines its content: model, weights digest, backend, precision, input-shape
policy, export recipe and library versions. Change any of them and the key,
hence the file name, changes; the old file is simply no longer looked up.

Layout, under ``<cache dir>/artifacts``::

    <model>-<digest32>.<suffix>     the artifact
    <model>-<digest32>.json         its key fields, for inspection

Concurrency: a builder writes to a unique temporary file in the same directory
and renames it into place with ``os.replace`` (atomic on POSIX), so readers see
either no file or a whole one. Several processes that miss at once each build;
the last rename wins and every one of them returns a valid file.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import time
import uuid
from collections.abc import Callable, Iterator, Mapping
from contextlib import suppress
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

from pipeline.errors import ModelLoadError, first_line

T = TypeVar("T")
ARTIFACTS_SUBDIR = "artifacts"
SUFFIXES = {"onnxruntime": ".onnx", "torchscript": ".pt"}
DEFAULT_SUFFIX = ".artifact"
TMP_SUFFIX = ".tmp"
STALE_TMP_S = 3600.0  # a builder's temporary file this old belongs to a dead process
SLUG_CHARS = 40
log = logging.getLogger("imgpipe.backends.artifacts")


@dataclass(frozen=True)
class ArtifactKey:
    """Everything that determines an artifact's content."""

    model: str
    weights_digest: str
    input_policy: str  # e.g. "dynamic-batch:3x224x224"
    recipe: str  # the builder's own version: bump it when the export changes
    versions: tuple[tuple[str, str], ...] = field(default=())  # (library, version), sorted
    backend: str = "onnxruntime"
    precision: str = "fp32"

    def fields(self) -> dict[str, Any]:
        """The key as a JSON-ready dict (what the sidecar holds)."""
        return {"model": self.model, "weights_digest": self.weights_digest,
                "backend": self.backend, "precision": self.precision,
                "input_policy": self.input_policy, "recipe": self.recipe,
                "versions": dict(self.versions)}

    def digest(self) -> str:
        """BLAKE2b-128 of the canonical JSON of the fields, as 32 hex digits."""
        canonical = json.dumps(self.fields(), sort_keys=True, separators=(",", ":"))
        return hashlib.blake2b(canonical.encode(), digest_size=16).hexdigest()


def library_versions(versions: Mapping[str, str]) -> tuple[tuple[str, str], ...]:
    """`ArtifactKey.versions` from a {library: version} mapping."""
    return tuple(sorted(versions.items()))


class ArtifactStore:
    """Artifacts in one directory; `built` and `reused` count this instance's calls."""

    def __init__(self, directory: Path) -> None:
        self.directory = Path(directory)
        self.built = 0
        self.reused = 0

    @classmethod
    def in_cache(cls, cache_dir: Path) -> ArtifactStore:
        """The store that lives in imgpipe's cache directory (`CacheSettings.directory()`)."""
        return cls(Path(cache_dir) / ARTIFACTS_SUBDIR)

    def path_for(self, key: ArtifactKey) -> Path:
        slug = re.sub(r"[^A-Za-z0-9_.-]", "_", Path(key.model).name)[:SLUG_CHARS]
        suffix = SUFFIXES.get(key.backend, DEFAULT_SUFFIX)
        return self.directory / f"{slug}-{key.digest()}{suffix}"

    def sidecar_for(self, key: ArtifactKey) -> Path:
        return self.path_for(key).with_suffix(".json")

    def get_or_build(self, key: ArtifactKey, build: Callable[[Path], None]) -> Path:
        """The artifact's path; `build(tmp_path)` writes it first when it is missing.

        Raises OSError when the directory cannot be written; whatever `build`
        raises propagates, and its temporary file is removed.
        """
        path = self.path_for(key)
        if path.is_file():
            self.reused += 1
            return path
        self.directory.mkdir(parents=True, exist_ok=True)
        self._remove_stale_temporaries()
        tmp = self._temporary(path)
        try:
            build(tmp)
            if not tmp.is_file() or tmp.stat().st_size == 0:
                raise OSError(f"the builder wrote nothing to {tmp.name}")
            _fsync(tmp)
            # The sidecar goes first: a crash in between leaves only a harmless sidecar.
            self._write_sidecar(key, path, tmp.stat().st_size)
            os.replace(tmp, path)
        finally:
            with suppress(FileNotFoundError):
                tmp.unlink()
        self.built += 1
        return path

    def open(self, key: ArtifactKey, build: Callable[[Path], None],
             load: Callable[[Path], T]) -> tuple[Path, T]:
        """`load` the artifact, building it first when missing. A stored artifact that
        will not load (corrupt, truncated) is discarded and rebuilt once; a freshly
        built one that will not load is a ModelLoadError, as is an unwritable store."""
        built_before = self.built
        path = self._get_or_build(key, build)
        try:
            return path, load(path)
        except Exception as exc:  # loaders (onnxruntime, torch.jit) share no useful base class
            if self.built > built_before:
                raise ModelLoadError(f"cannot load the {key.backend} artifact built for "
                                     f"{key.model!r} ({path.name}): {first_line(exc)}") from exc
            log.warning("stored artifact %s does not load (%s): rebuilding it",
                        path.name, first_line(exc))
            self.discard(key)
        path = self._get_or_build(key, build)
        try:
            return path, load(path)
        except Exception as exc:
            raise ModelLoadError(f"cannot load the {key.backend} artifact built for "
                                 f"{key.model!r} ({path.name}): {first_line(exc)}") from exc

    def _get_or_build(self, key: ArtifactKey, build: Callable[[Path], None]) -> Path:
        try:
            return self.get_or_build(key, build)
        except OSError as exc:
            raise ModelLoadError(f"cannot write the model artifact store {self.directory}: "
                                 f"{exc.strerror or exc}") from exc

    def discard(self, key: ArtifactKey) -> None:
        """Remove an artifact its user could not load, so the next call rebuilds it."""
        for path in (self.path_for(key), self.sidecar_for(key)):
            with suppress(FileNotFoundError):
                path.unlink()

    def entries(self) -> Iterator[dict[str, Any]]:
        """The sidecars of the artifacts present, for inspection (`imgpipe cache`)."""
        if not self.directory.is_dir():
            return
        for sidecar in sorted(self.directory.glob("*.json")):
            try:
                entry = json.loads(sidecar.read_text(encoding="utf-8"))
            except (OSError, ValueError):
                continue
            if isinstance(entry, dict) and (self.directory / str(entry.get("file"))).is_file():
                yield entry

    def _write_sidecar(self, key: ArtifactKey, path: Path, size_bytes: int) -> None:
        entry = {**key.fields(), "digest": key.digest(), "file": path.name,
                 "size_bytes": size_bytes, "built_at": time.time()}
        tmp = self._temporary(path.with_suffix(".json"))
        try:
            tmp.write_text(json.dumps(entry, indent=2, sort_keys=True) + "\n", encoding="utf-8")
            os.replace(tmp, path.with_suffix(".json"))
        finally:
            with suppress(FileNotFoundError):
                tmp.unlink()

    @staticmethod
    def _temporary(path: Path) -> Path:
        # Same directory (so os.replace is a rename), unique per process and call.
        return path.with_name(f".{path.name}.{os.getpid()}.{uuid.uuid4().hex[:8]}{TMP_SUFFIX}")

    def _remove_stale_temporaries(self) -> None:
        cutoff = time.time() - STALE_TMP_S
        for tmp in self.directory.glob(f".*{TMP_SUFFIX}"):
            with suppress(OSError):
                if tmp.stat().st_mtime < cutoff:
                    tmp.unlink()


def _fsync(path: Path) -> None:
    """Flush a file's data before it is renamed into place (no empty file after a crash)."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
