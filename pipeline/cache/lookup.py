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
from pipeline.embeddings import wants_embedding, wants_predictions
from pipeline.spec import views_digest


@dataclass(frozen=True)
class ResultScope:
    """Everything besides the image that determines its predictions."""

    model_id: str
    weights_digest: str
    topk: int
    labels_digest: str
    normalize_embeddings: bool = True  # model.normalize_embeddings: it changes the vectors

    def output_scope(self, output: str) -> str:
        """The output kind as the result key holds it: embeddings with their norm."""
        if output == "logits":
            return output
        return f"{output}:{'l2' if self.normalize_embeddings else 'raw'}"

    @staticmethod
    def labels_digest_of(labels: list[str]) -> str:
        return hashlib.blake2b("\n".join(labels).encode(), digest_size=16).hexdigest()


@dataclass
class Found:
    """What the cache knows about one image."""

    digest: str
    tier: str  # the tier that answered ("local", "redis"), or "miss"
    pixels: Optional[np.ndarray] = None
    predictions: Optional[Predictions] = None  # [] with an embedding alone
    embedding: Optional[np.ndarray] = None


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
    ones, so neither is ever served for the other. `output` scopes results
    the same way: logits, embeddings and both are kept apart.
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

    def find_unread(self, path: str, info: os.stat_result, tta: str = "none",
                    output: str = "logits") -> Optional[Found]:
        """What the cache knows about an unchanged file, without reading it."""
        key = file_key(self.cfg.prefix, path, info)
        digest = self.cache.get_local(key, lambda blob: decode_file_digest(key, blob))
        if digest is None:
            return None
        found = self.find_digest(digest, tta, output)
        return found if found.tier != MISS else None

    def remember_file(self, path: str, info: os.stat_result, digest: str) -> None:
        key = file_key(self.cfg.prefix, path, info)
        self.cache.put_local(key, encode_file_digest(key, digest))

    def find(self, data: bytes, tta: str = "none", output: str = "logits") -> Found:
        """The answer if known, else the preprocessed tensor if known."""
        return self.find_digest(image_digest(data), tta, output)

    def find_digest(self, digest: str, tta: str = "none", output: str = "logits") -> Found:
        """Lookups by the digest of an image's bytes."""
        if self.scope is not None:
            found = self._find_answer(digest, tta, output)
            if found is not None:
                return found
        made_under = views_digest(self.spec_digest, tta)
        pixels, tier = self.cache.get_tensor(self._tensor_key(digest, tta), made_under)
        return Found(digest, tier, pixels=pixels)

    def store_tensor(self, digest: str, pixels: np.ndarray, tta: str = "none") -> None:
        self.cache.put_tensor(self._tensor_key(digest, tta), pixels,
                              views_digest(self.spec_digest, tta))

    def store_predictions(self, digest: str, predictions: Predictions,
                          tta: str = "none", output: str = "logits",
                          embedding: Optional[np.ndarray] = None) -> None:
        """Keep an answer: predictions, and with an embedding output its vector."""
        if self.scope is None:
            return
        key = self._result_key(digest, tta, output)
        if embedding is None:
            self.results.put(key, predictions)
        else:
            self.results.put_embedded(key, predictions, embedding)

    def _find_answer(self, digest: str, tta: str, output: str) -> Optional[Found]:
        assert self.scope is not None
        key = self._result_key(digest, tta, output)
        if not wants_embedding(output):
            predictions, tier = self.results.get(key, self.scope.topk)
            return None if predictions is None else Found(digest, tier, predictions=predictions)
        topk = self.scope.topk if wants_predictions(output) else None
        answer, tier = self.results.get_embedded(key, topk)
        if answer is None:
            return None
        return Found(digest, tier, predictions=answer[0], embedding=answer[1])

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

    def _result_key(self, digest: str, tta: str = "none", output: str = "logits") -> str:
        assert self.scope is not None
        s = self.scope
        return result_key(self.cfg.prefix, digest, s.model_id, s.weights_digest, s.topk,
                          spec_digest=views_digest(self.spec_digest, tta),
                          labels_digest=s.labels_digest, output=s.output_scope(output))
