"""The inference loop: batches in, one record per input out.

Errors travel with the batch and become error records; one bad image never
fails its neighbours. Items the result cache answered skip the model. The
loop owns no I/O: records go to a sink callback. Items that ask for an
embedding (`Prepared.output`) get their views' pooled features from the same
forward pass as the logits (pipeline/embeddings.py).
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Optional, cast

import numpy as np

if TYPE_CHECKING:

    from pipeline.backends import FeaturesBackend, InferenceBackend
from pipeline.batching import Batcher
from pipeline.embeddings import pooled, wants_embedding, wants_predictions
from pipeline.errors import TransientError
from pipeline.items import Prepared
from pipeline.predictions import (
    Prediction,
    Record,
    error_record,
    mean_over_views,
    ok_record,
    softmax,
    to_numpy,
    top_k_of_probabilities,
)

Remember = Callable[[Prepared, list[Prediction]], None]
Outputs = tuple[np.ndarray, Optional[np.ndarray]]  # logits, and features when asked for
log = logging.getLogger("imgpipe.inference")
IDLE_S = 0.5


class InferenceLoop:
    """Scores batches of Prepared items with one inference backend."""

    def __init__(self, backend: InferenceBackend, topk: int,
                 remember: Optional[Remember] = None, default_topk: Optional[int] = None,
                 model_name: Optional[str] = None, normalize_embeddings: bool = True) -> None:
        self.backend = backend
        self.normalize_embeddings = normalize_embeddings
        # Named up front when the backend loads lazily: records of cached answers need
        # the name, not the model.
        self.model_name = model_name or backend.model.name
        self.topk = topk  # computed (and cached) per image; a job may ask for fewer
        self.default_topk = default_topk or topk
        self.remember = remember
        self.batches = 0

    def score(self, batch: Sequence[Prepared]) -> list[Record]:
        """One record per item, in the order given."""
        ready = [item for item in batch if item.error is None and item.predictions is None]
        if ready:
            self._infer(ready)
        return [error_record(item) if item.error is not None
                else ok_record(item, self.model_name, self._kept(item)) for item in batch]

    def _kept(self, item: Prepared) -> list[Prediction]:
        return (item.predictions or [])[:item.job.topk or self.default_topk]

    def _infer(self, ready: list[Prepared]) -> None:
        """Score every view of every item in one model batch; an item's prediction
        is the mean of its views' softmax probabilities (one view: its own), and
        its embedding the mean of their features."""
        started = time.perf_counter()
        samples: list[np.ndarray] = []
        views: list[int] = []
        for item in ready:
            assert item.pixels is not None
            stacked = item.pixels.ndim == 4  # a TTA item: views x C x H x W
            samples.extend(item.pixels if stacked else [item.pixels])
            views.append(item.pixels.shape[0] if stacked else 1)
        logits, features = self._outputs(samples, any(wants_embedding(item.output)
                                                      for item in ready))
        probs = mean_over_views(softmax(logits), views)
        predictions = top_k_of_probabilities(probs, self.topk, self.backend.model.labels)
        embeddings = (None if features is None
                      else pooled(features, views, self.normalize_embeddings))
        per_item_ms = (time.perf_counter() - started) * 1000 / len(ready)
        h2d_ms = self.backend.last_staging_s * 1000 / len(ready)
        for index, (item, top) in enumerate(zip(ready, predictions, strict=True)):
            item.timings_ms["h2d"] = h2d_ms
            item.timings_ms["inference"] = per_item_ms
            item.predictions = top if wants_predictions(item.output) else []
            if embeddings is not None and wants_embedding(item.output):
                item.embedding = embeddings[index]
            if self.remember is not None:
                self.remember(item, item.predictions)
        self.batches += 1

    def _outputs(self, pixels: list[np.ndarray], features: bool) -> Outputs:
        """The batch's logits (and features); a batch too big for the device's free
        memory is halved."""
        torch = sys.modules.get("torch")
        if torch is None:  # a backend that runs without torch runs without CUDA
            return self._run(pixels, features)
        try:
            return self._run(pixels, features)
        except torch.cuda.OutOfMemoryError as exc:
            if len(pixels) == 1:
                raise TransientError("out of device memory on a single image") from exc
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        log.warning("out of device memory on a batch of %d: running it in halves", len(pixels))
        half = len(pixels) // 2
        (logits, first), (more, second) = (self._outputs(pixels[:half], features),
                                           self._outputs(pixels[half:], features))
        joined = None if first is None or second is None else np.concatenate([first, second])
        return np.concatenate([logits, more]), joined

    def _run(self, pixels: list[np.ndarray], features: bool) -> Outputs:
        if not features:
            return to_numpy(self.backend.predict(pixels)), None
        # The engine builds a backend with features whenever model.output asks for them.
        logits, pooled_features = cast("FeaturesBackend", self.backend).predict_features(pixels)
        return to_numpy(logits), to_numpy(pooled_features)

    def drain(self, batcher: Batcher[Prepared], sink: Callable[[list[Record]], None],
              idle: Callable[[], None] = lambda: None) -> None:
        """Score batches until the batcher reports the end of its input; `idle` is
        called whenever half a second passes without one."""
        while (batch := batcher.next_batch(timeout_s=IDLE_S)) is not None:
            if batch:
                sink(self.score(batch))
            else:
                idle()
