"""Turning logits and errors into output records (plain dicts, JSON-ready)."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING, Any

from pipeline.items import Prepared

if TYPE_CHECKING:
    import torch  # only top_k needs it: records are made without it

Record = dict[str, Any]


def top_k(logits: torch.Tensor, k: int, labels: Sequence[str]) -> list[list[dict[str, Any]]]:
    """Softmax top-k per row: [{"label", "index", "score"}, ...] best first."""
    import torch

    probs = torch.softmax(logits.float(), dim=1)
    scores, indices = probs.topk(min(k, probs.shape[1]), dim=1)
    rows = zip(scores.cpu().tolist(), indices.cpu().tolist(), strict=True)
    return [[{"label": labels[i], "index": i, "score": round(s, 6)}
             for s, i in zip(row_scores, row_indices, strict=True)]
            for row_scores, row_indices in rows]


def ok_record(item: Prepared, model: str, predictions: list[dict[str, Any]]) -> Record:
    record = _base(item, "ok")
    record.update(model=model, predictions=predictions, timings_ms=_rounded(item.timings_ms))
    if item.cache is not None:
        record["cache"] = item.cache
    return record


def error_record(item: Prepared) -> Record:
    assert item.error is not None
    record = _base(item, "error")
    record["error"] = {"code": item.error.code, "message": item.error.message}
    return record


def _base(item: Prepared, status: str) -> Record:
    record: Record = {"path": item.job.path, "status": status}
    if item.job.ref is not None:
        record["ref"] = item.job.ref
    return record


def _rounded(timings: dict[str, float]) -> dict[str, float]:
    return {stage: round(ms, 3) for stage, ms in timings.items()}
