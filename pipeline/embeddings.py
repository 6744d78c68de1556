"""Embeddings: a model's pooled penultimate features as one vector per image.

What a run answers is its output kind (`model.output`, a job's `output`):
"logits" (the top-k predictions), "embedding" (the vector alone) or "both".
An image's vector is the mean of its views' features (test-time
augmentation), then L2-normalised unless `model.normalize_embeddings` is
off, and kept as float16: half the bytes of float32, and a cosine between
two normalised vectors moves by about 1e-3 at most. On the wire and in the
cache it is little-endian float16, base64 text where the carrier is text.
"""

from __future__ import annotations

import base64
from collections.abc import Sequence
from typing import Literal, get_args

import numpy as np

OutputKind = Literal["logits", "embedding", "both"]
OUTPUTS: tuple[str, ...] = get_args(OutputKind)
DTYPE = np.dtype("<f2")  # little-endian float16, whatever the host's byte order
DTYPE_NAME = "float16"
# A zero vector (a dead feature map) stays zero instead of becoming NaN.
NORM_FLOOR = 1e-12


def wants_predictions(output: str) -> bool:
    return output != "embedding"


def wants_embedding(output: str) -> bool:
    return output != "logits"


def answerable(output: str) -> tuple[str, ...]:
    """The output kinds a model set up for `output` can answer: a backend that
    gives features gives logits in the same pass, so any kind; else logits alone."""
    return OUTPUTS if wants_embedding(output) else ("logits",)


def pooled(features: np.ndarray, views: Sequence[int], normalize: bool) -> np.ndarray:
    """One float16 row per image from consecutive rows of per-view `features`:
    the mean of its `views[i]` rows (in float32), L2-normalised if asked."""
    rows = np.asarray(features, dtype=np.float32)
    starts = np.cumsum([0, *views[:-1]])
    means = np.stack([rows[start:start + count].mean(axis=0)
                      for start, count in zip(starts, views, strict=True)])
    if normalize:
        norms = np.linalg.norm(means, axis=1, keepdims=True)
        means = means / np.maximum(norms, NORM_FLOOR)
    return means.astype(DTYPE)


def to_base64(vector: np.ndarray) -> str:
    """The vector as base64 text of its little-endian float16 bytes."""
    return base64.b64encode(np.ascontiguousarray(vector, dtype=DTYPE).tobytes()).decode("ascii")


def from_base64(text: str, dim: int) -> np.ndarray:
    """The float16 vector `to_base64` wrote; ValueError when it is not `dim` long."""
    raw = base64.b64decode(text, validate=True)
    if len(raw) != dim * DTYPE.itemsize:
        raise ValueError(f"embedding is {len(raw)} bytes, not {dim} float16 values")
    return np.frombuffer(raw, dtype=DTYPE)
