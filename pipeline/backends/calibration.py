"""Real images, preprocessed as in production: int8 calibration and validation sets.

A set is the first `count` files of a directory in path order (``heapq``
keeps only those, however large the directory). Its digest covers the
preprocessing spec and each file's path, size and modification time, so an
int8 artifact is rebuilt when its calibration images change, and only then.
"""

from __future__ import annotations

import hashlib
import heapq
import os
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pipeline.errors import ImgpipeError
from pipeline.spec import InputLimits, PreprocessSpec

CALIBRATION_IMAGES = 128  # ORT's MinMax ranges settle well before this many images


def first_files(directory: Path, count: int) -> list[str]:
    """The first `count` image candidates under `directory`, in path order."""
    from pipeline.sources import directory as walker

    return heapq.nsmallest(count, (job.path for job in walker.walk(str(directory),
                                                                   recursive=True)))


def preprocessed(paths: list[str], spec: PreprocessSpec,
                 limits: InputLimits) -> dict[str, np.ndarray]:
    """{path: uint8 CHW array} from the Pillow backend, in order; files that do not
    decode are left out."""
    from pipeline.preprocess.select import create_backend
    from pipeline.sources.files import read_file

    backend = create_backend("pillow", spec, limits)
    backend.setup()
    samples = {}
    try:
        for path in paths:
            try:
                outcome = backend.run([read_file(path, limits.max_file_bytes)])[0]
            except ImgpipeError:
                continue
            if isinstance(outcome, np.ndarray):
                samples[path] = outcome
    finally:
        backend.close()
    return samples


@dataclass(frozen=True)
class CalibrationSet:
    """The images an int8 variant is calibrated on; read only when it is built."""

    files: tuple[str, ...]
    spec: PreprocessSpec
    limits: InputLimits

    @classmethod
    def from_directory(cls, directory: Path, spec: PreprocessSpec, limits: InputLimits,
                       count: int = CALIBRATION_IMAGES) -> CalibrationSet:
        files = first_files(directory, count)
        if not files:
            raise ImgpipeError(f"calibration directory {directory} holds no files")
        return cls(tuple(files), spec, limits)

    def digest(self) -> str:
        """BLAKE2b-128 of the spec and every file's path, size and mtime."""
        h = hashlib.blake2b(self.spec.digest().encode(), digest_size=16)
        for path in self.files:
            try:
                stat = os.stat(path)
                h.update(f"\0{path}\0{stat.st_size}\0{stat.st_mtime_ns}".encode())
            except OSError:
                h.update(f"\0{path}\0missing".encode())
        return h.hexdigest()

    def samples(self) -> list[np.ndarray]:
        samples = list(preprocessed(list(self.files), self.spec, self.limits).values())
        if not samples:
            raise ImgpipeError(f"none of the {len(self.files)} calibration files decodes "
                               f"(first: {self.files[0]})")
        return samples
