"""Turning logits and errors into output records (typed dicts, JSON-ready)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any, Literal

import numpy as np

from pipeline.embeddings import wants_embedding, wants_predictions
from pipeline.items import Prediction, Prepared, Record

__all__ = ["Prediction", "Record", "error_record", "mean_over_views", "ok_record", "softmax",
           "predictions_of", "to_numpy", "top_k", "top_k_of_probabilities"]


def top_k(logits: Any, k: int, labels: Sequence[str]) -> list[list[Prediction]]:
    """Softmax top-k per row: [{"label", "index", "score"}, ...] best first.

    `logits` is a NumPy array or a torch tensor (on any device); the softmax is
    computed here in float64, so every backend's scores round the same way.
    """
    return top_k_of_probabilities(softmax(logits), k, labels)


def softmax(logits: Any) -> np.ndarray:
    """Each row's softmax, in float64."""
    rows = to_numpy(logits).astype(np.float64)
    rows = np.exp(rows - rows.max(axis=1, keepdims=True))
    return rows / rows.sum(axis=1, keepdims=True)


def mean_over_views(probs: np.ndarray, views: Sequence[int]) -> np.ndarray:
    """One row per image: the mean of its `views[i]` consecutive rows of `probs`
    (test-time augmentation's prediction); a one-view image keeps its row as it is."""
    if all(count == 1 for count in views):
        return probs
    starts = np.cumsum([0, *views[:-1]])
    return np.stack([probs[start:start + count].mean(axis=0)
                     for start, count in zip(starts, views, strict=True)])


def top_k_of_probabilities(probs: np.ndarray, k: int,
                           labels: Sequence[str]) -> list[list[Prediction]]:
    """Top-k per row of probabilities: [{"label", "index", "score"}, ...] best first."""
    k = min(k, probs.shape[1])
    # Ties keep the lower class index first, as a stable sort of -p does.
    best = np.argsort(-probs, axis=1, kind="stable")[:, :k]
    return predictions_of(best, np.take_along_axis(probs, best, axis=1), labels)


def predictions_of(indices: np.ndarray, scores: np.ndarray,
                   labels: Sequence[str]) -> list[list[Prediction]]:
    """Rows of class indices and their probabilities, best first, as predictions
    (scores rounded to 6 decimals)."""
    return [[Prediction(label=labels[i], index=int(i), score=round(float(score), 6))
             for i, score in zip(row, row_scores, strict=True)]
            for row, row_scores in zip(indices, scores, strict=True)]


def to_numpy(logits: Any) -> np.ndarray:
    """A backend's logits as a NumPy array (torch tensors are detached and moved)."""
    if isinstance(logits, np.ndarray):
        return logits
    return logits.detach().float().cpu().numpy()


def ok_record(item: Prepared, model: str, predictions: list[Prediction]) -> Record:
    """`predictions` unless the item asked for its embedding alone; its embedding
    (a float16 array, for the sink to place) when it asked for one."""
    record = _base(item, "ok")
    record["model"] = model
    if wants_predictions(item.output):
        record["predictions"] = predictions
    if item.embedding is not None and wants_embedding(item.output):
        record["embedding"] = item.embedding
    record["timings_ms"] = _rounded(item.timings_ms)
    if item.cache is not None:
        record["cache"] = item.cache
    if item.views > 1:
        record["views"] = item.views
    return record


def error_record(item: Prepared) -> Record:
    assert item.error is not None
    record = _base(item, "error")
    record["error"] = {"code": item.error.code, "message": item.error.message}
    return record


def _base(item: Prepared, status: Literal["ok", "error"]) -> Record:
    record: Record = {"path": item.job.path, "status": status}
    if item.job.ref is not None:
        record["ref"] = item.job.ref
    return record


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {stage: round(ms, 3) for stage, ms in timings.items()}
