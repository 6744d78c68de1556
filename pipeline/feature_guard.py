"""The accuracy guard for embeddings: a variant's features against eager fp32's.

A variant (an export, a trace, a compiled or reduced-precision model) gives
embeddings only where its pooled features point the way eager fp32's do on
real photographs: the cosine similarity of each photograph's two feature
vectors must reach `MIN_COSINE` on average AND on the worst photograph. The
minimum as well as the mean, because an embedding is used one image at a
time (its nearest neighbours, its duplicates): a variant that is fine on
average but turns a few images' vectors gives those images wrong answers,
and the mean hides them. The minimum rather than the 1st percentile: the
checks run on 6 to 500 photographs, where the 1st percentile is the minimum
or next to it, so the minimum is the same test, stated plainly.

Cosine similarity is what searches and deduplication compare (on the
L2-normalised vectors `pipeline.embeddings.pooled` makes), and it ignores a
uniform change of scale, which no use of an embedding sees. NumPy only: the
engine reads the verdicts recorded here without importing torch.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Optional

import numpy as np

from pipeline.embeddings import NORM_FLOOR
from pipeline.predictions import to_numpy

MIN_COSINE = 0.99


@dataclass(frozen=True)
class FeatureAgreement:
    """How closely a variant's features follow eager fp32's on the same images."""

    images: int
    mean_cosine: float
    min_cosine: float

    def __str__(self) -> str:
        return (f"features' cosine to eager fp32's: mean {self.mean_cosine:.4f}, minimum "
                f"{self.min_cosine:.4f} over {self.images} photographs")


def cosines(reference: np.ndarray, candidate: np.ndarray) -> np.ndarray:
    """Each row's cosine similarity between two (N, dim) feature arrays; two zero
    rows (a dead feature map in both) agree. ValueError when the shapes differ."""
    ref, cand = (np.asarray(a, dtype=np.float64) for a in (reference, candidate))
    if ref.shape != cand.shape or ref.ndim != 2:
        raise ValueError(f"reference gives features of shape {ref.shape}, candidate "
                         f"{cand.shape}")
    ref_norms, cand_norms = np.linalg.norm(ref, axis=1), np.linalg.norm(cand, axis=1)
    similarity = (ref * cand).sum(axis=1) / np.maximum(ref_norms * cand_norms, NORM_FLOOR)
    both_zero = (ref_norms < NORM_FLOOR) & (cand_norms < NORM_FLOOR)
    return np.where(both_zero, 1.0, similarity)


def feature_agreement(reference: np.ndarray, candidate: np.ndarray) -> FeatureAgreement:
    """The mean and the minimum of the rows' cosine similarities."""
    similarity = cosines(reference, candidate)
    if similarity.size == 0:
        raise ValueError("feature agreement needs at least one image")
    return FeatureAgreement(int(similarity.size), float(similarity.mean()),
                            float(similarity.min()))


def refusal(agreement: FeatureAgreement, min_cosine: float = MIN_COSINE) -> Optional[str]:
    """Why a variant is refused for embeddings (one line, with the numbers), or None."""
    if agreement.mean_cosine >= min_cosine and agreement.min_cosine >= min_cosine:
        return None
    return f"{agreement}, under {min_cosine}"


def features_of(backend: Any, samples: Sequence[np.ndarray]) -> np.ndarray:
    """(N, dim) float32 features of `samples` from a backend built for embeddings
    (its predict_features), in batches it accepts."""
    step = backend.max_batch_size
    return np.concatenate([to_numpy(backend.predict_features(samples[start:start + step])[1])
                           for start in range(0, len(samples), step)]).astype(np.float32)
