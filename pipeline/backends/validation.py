"""Does a candidate variant (another backend, bf16, int8) score like the reference?

The reference is the eager fp32 `TorchBackend`. Both score the same
preprocessed samples; the candidate is accepted when its top-1 class agrees
with the reference's on at least `threshold` of them.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

import numpy as np
import torch

from pipeline.errors import ModelLoadError
from pipeline.predictions import to_numpy

DEFAULT_THRESHOLD = 0.99


class Scorer(Protocol):
    """What `agreement` needs of a backend."""

    max_batch_size: int

    def predict(self, samples: Sequence[np.ndarray]) -> torch.Tensor | np.ndarray: ...


@dataclass(frozen=True)
class Agreement:
    top1: float  # fraction of samples with the same top-1 class
    max_score_drift: float  # largest absolute difference of any softmax probability
    images: int


def agreement(reference: Scorer, candidate: Scorer, samples: Sequence[np.ndarray]) -> Agreement:
    """Score `samples` (uint8 CHW) with both backends, in batches both accept."""
    if not samples:
        raise ValueError("agreement needs at least one sample")
    step = min(reference.max_batch_size, candidate.max_batch_size)
    same, drift = 0, 0.0
    for start in range(0, len(samples), step):
        chunk = samples[start:start + step]
        expected = _probabilities(reference.predict(chunk))
        actual = _probabilities(candidate.predict(chunk))
        if expected.shape != actual.shape:
            raise ValueError(f"reference gives {tuple(expected.shape)} scores, "
                             f"candidate {tuple(actual.shape)}")
        same += int((expected.argmax(dim=1) == actual.argmax(dim=1)).sum())
        drift = max(drift, float((expected - actual).abs().max()))
    return Agreement(top1=same / len(samples), max_score_drift=drift, images=len(samples))


def check(result: Agreement, threshold: float = DEFAULT_THRESHOLD) -> None:
    """ModelLoadError (one line, with the numbers) when top-1 agreement is under `threshold`."""
    if result.top1 < threshold:
        raise ModelLoadError(
            f"candidate backend disagrees with the torch fp32 reference: top-1 agreement "
            f"{_percent(result.top1)} is under the {_percent(threshold)} threshold "
            f"({result.images} images, max score drift {result.max_score_drift:.4g})")


def _probabilities(logits: torch.Tensor | np.ndarray) -> torch.Tensor:
    return torch.softmax(torch.as_tensor(to_numpy(logits)).float(), dim=1)


def _percent(fraction: float) -> str:
    return f"{fraction * 100:.4g}%"
