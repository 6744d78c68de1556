"""The cache as the pipeline sees it: look an image up by its bytes, store what
was computed. One instance per process (preprocessing workers and the engine)."""

from __future__ import annotations

import hashlib
import multiprocessing.util
import os
from collections import Counter
from dataclasses import dataclass
from typing import Optional

import numpy as np

from pipeline.cache import COUNTERS, CacheTier
from pipeline.cache.codec import decode_file_digest, encode_file_digest
from pipeline.cache.keys import file_key, image_digest, result_key, tensor_key
from pipeline.cache.local import LocalTier
from pipeline.cache.results import Predictions, ResultCache
from pipeline.cache.tiered import MISS, TieredCache
from pipeline.config import CacheSettings
from pipeline.spec import views_digest


@dataclass(frozen=True)
class ResultScope:
    """Everything besides the image that determines its predictions."""

    model_id: str
    weights_digest: str
    topk: int
    labels_digest: str

    @staticmethod
    def labels_digest_of(labels: list[str]) -> str:
        return hashlib.blake2b("\n".join(labels).encode(), digest_size=16).hexdigest()


@dataclass
class Found:
    """What the cache knows about one image."""

    digest: str
    tier: str  # the tier that answered ("local", "redis"), or "miss"
    pixels: Optional[np.ndarray] = None
    predictions: Optional[Predictions] = None


def open_tiers(cfg: CacheSettings) -> list[CacheTier]:
    """The configured tiers in read order: local first, then Redis."""
    tiers: list[CacheTier] = [LocalTier(cfg.directory(), cfg.max_bytes)]
    server = cfg.redis()
    if server is not None:
        from pipeline.cache.redis_tier import RedisTier  # redis-py only when configured

        tiers.append(RedisTier(server, cfg.prefix, cfg.redis_ttl_s, cfg.redis_max_entry_bytes,
                               retry_interval_s=cfg.redis_retry_interval_s))
    return tiers


class CacheLookup:
    """Tensor and result lookups keyed by content, writes queued off the hot path.

    `tta` (a test-time augmentation mode) scopes every lookup and write: an
    image's views are one tensor entry under a key that adds the view set
    (`spec.views_digest`), and its TTA predictions are apart from its plain
    ones, so neither is ever served for the other.
    """

    def __init__(self, cfg: CacheSettings, spec_digest: str,
                 scope: Optional[ResultScope]) -> None:
        self.cfg = cfg
        self.spec_digest = spec_digest
        self.scope = scope if cfg.results else None
        self.cache = TieredCache(open_tiers(cfg), cfg.write_queue_items, cfg.hmac_key())
        self.results = ResultCache(self.cache)
        self._reported: dict[str, Counter[str]] = {}

    def setup(self) -> None:
        self.cache.setup()
        # Pool workers leave through os._exit: flush queued writes before that.
        multiprocessing.util.Finalize(self, self.cache.close, exitpriority=10)

    def find_unread(self, path: str, info: os.stat_result,
                    tta: str = "none") -> Optional[Found]:
        """What the cache knows about an unchanged file, without reading it."""
        key = file_key(self.cfg.prefix, path, info)
        digest = self.cache.get_local(key, lambda blob: decode_file_digest(key, blob))
        if digest is None:
            return None
        found = self.find_digest(digest, tta)
        return found if found.tier != MISS else None

    def remember_file(self, path: str, info: os.stat_result, digest: str) -> None:
        key = file_key(self.cfg.prefix, path, info)
        self.cache.put_local(key, encode_file_digest(key, digest))

    def find(self, data: bytes, tta: str = "none") -> Found:
        """Predictions if known, else the preprocessed tensor if known."""
        return self.find_digest(image_digest(data), tta)

    def find_digest(self, digest: str, tta: str = "none") -> Found:
        """Lookups by the digest of an image's bytes."""
        if self.scope is not None:
            predictions, tier = self.results.get(self._result_key(digest, tta),
                                                 self.scope.topk)
            if predictions is not None:
                return Found(digest, tier, predictions=predictions)
        made_under = views_digest(self.spec_digest, tta)
        pixels, tier = self.cache.get_tensor(self._tensor_key(digest, tta), made_under)
        return Found(digest, tier, pixels=pixels)

    def store_tensor(self, digest: str, pixels: np.ndarray, tta: str = "none") -> None:
        self.cache.put_tensor(self._tensor_key(digest, tta), pixels,
                              views_digest(self.spec_digest, tta))

    def store_predictions(self, digest: str, predictions: Predictions,
                          tta: str = "none") -> None:
        if self.scope is not None:
            self.results.put(self._result_key(digest, tta), predictions)

    def counters_since_last_call(self) -> dict[str, Counter[str]]:
        """Per tier, how much each counter grew since the previous call.

        Workers send these deltas home with their results, so the engine can
        add up every process's tiers (hits, misses, errors, bytes).
        """
        deltas: dict[str, Counter[str]] = {}
        for tier in self.cache.tiers:
            now = Counter({k: int(v) for k, v in tier.stats.snapshot().items() if k in COUNTERS})
            before = self._reported.get(tier.name, Counter())
            self._reported[tier.name] = now
            deltas[tier.name] = now - before
        return deltas

    def close(self) -> None:
        self.cache.close()

    def _tensor_key(self, digest: str, tta: str = "none") -> str:
        return tensor_key(self.cfg.prefix, digest, views_digest(self.spec_digest, tta))

    def _result_key(self, digest: str, tta: str = "none") -> str:
        assert self.scope is not None
        s = self.scope
        return result_key(self.cfg.prefix, digest, s.model_id, s.weights_digest, s.topk,
                          spec_digest=views_digest(self.spec_digest, tta),
                          labels_digest=s.labels_digest)
