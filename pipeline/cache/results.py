"""The result cache: one image's predictions under one model configuration."""

from __future__ import annotations

from typing import Optional

import numpy as np

from pipeline.cache.codec import (
    CorruptEntry,
    decode_embedded,
    decode_result,
    encode_embedded,
    encode_result,
)
from pipeline.cache.tiered import TieredCache
from pipeline.items import Prediction

Predictions = list[Prediction]
Embedded = tuple[Predictions, np.ndarray]  # predictions ([] for "embedding") and the vector
# Softmax scores are float32 rounded to 6 decimals: each is off by at most
# 5e-7, and float32 adds about as much again to their sum.
SUM_TOLERANCE_PER_SCORE = 1e-6


class ResultCache:
    """Predictions by `keys.result_key`, stored through a `TieredCache`."""

    def __init__(self, cache: TieredCache) -> None:
        self.cache = cache

    def get(self, key: str, topk: int) -> tuple[Predictions | None, str]:
        """(predictions, tier name), or (None, "miss"); corrupt entries are misses,
        and so are entries that are not a top-`topk` ranking."""
        return self.cache.get_decoded(key, lambda blob: top_k_of(decode_result(blob), topk))

    def put(self, key: str, predictions: Predictions) -> bool:
        """Queue the predictions for every tier; False when the write was dropped."""
        return self.cache.put(key, encode_result(predictions))


    def get_embedded(self, key: str, topk: Optional[int]) -> tuple[Embedded | None, str]:
        """(predictions, embedding), or (None, "miss"), as `get`; `topk` None means
        an answer without predictions (model.output "embedding")."""
        return self.cache.get_decoded(key, lambda blob: _checked(decode_embedded(blob), topk))

    def put_embedded(self, key: str, predictions: Predictions, embedding: np.ndarray) -> bool:
        return self.cache.put(key, encode_embedded(predictions, embedding))


def _checked(answer: Embedded, topk: Optional[int]) -> Embedded:
    predictions, embedding = answer
    if topk is None and predictions:
        raise CorruptEntry("predictions cached for an answer without them")
    return (predictions if topk is None else top_k_of(predictions, topk)), embedding


def top_k_of(predictions: Predictions, topk: int) -> Predictions:
    """`predictions` if they can be a top-`topk` answer; CorruptEntry otherwise.

    That is `topk` of them, or fewer when they rank every class of a model that
    has fewer than `topk`: then they are classes 0..n-1 and their scores add up to 1.
    """
    if len(predictions) == topk or (len(predictions) < topk and _every_class(predictions)):
        return predictions
    raise CorruptEntry(f"{len(predictions)} predictions cached for a top-{topk} answer")


def _every_class(predictions: Predictions) -> bool:
    indices = {p["index"] for p in predictions}
    total = sum(p["score"] for p in predictions)
    tolerance = SUM_TOLERANCE_PER_SCORE * (len(predictions) + 1)
    return indices == set(range(len(predictions))) and abs(total - 1) <= tolerance
