"""The result cache: one image's predictions under one model configuration."""

from __future__ import annotations

from typing import Any

from pipeline.cache.codec import decode_result, encode_result
from pipeline.cache.tiered import TieredCache

Predictions = list[dict[str, Any]]


class ResultCache:
    """Predictions by `keys.result_key`, stored through a `TieredCache`."""

    def __init__(self, cache: TieredCache) -> None:
        self.cache = cache

    def get(self, key: str) -> tuple[Predictions | None, str]:
        """(predictions, tier name), or (None, "miss"); corrupt entries are misses."""
        return self.cache.get_decoded(key, decode_result)

    def put(self, key: str, predictions: Predictions) -> bool:
        """Queue the predictions for every tier; False when the write was dropped."""
        return self.cache.put(key, encode_result(predictions))
