"""The inference loop: batches in, one record per input out.

Errors travel with the batch and become error records; one bad image never
fails its neighbours. Items the result cache answered skip the model. The
loop owns no I/O: records go to a sink callback. Items that ask for an
embedding (`Prepared.output`) get their views' pooled features from the same
forward pass as the logits (pipeline/embeddings.py).

A batch is launched, then collected. With a torch backend the softmax, the
mean over views and the top-k run on the device and only k columns per
image come back (pipeline/backends/reduce.py), so `drain` launches batch N+1
before it collects batch N: the host stages the next batch while the device
works. Batches are still delivered in order, and one in flight is collected
as soon as the batcher has nothing more at once, or its input ends. ONNX
Runtime on the GPU answers with tensors on the device too (I/O binding); on
the CPU it answers on the host, in NumPy, and its batch is delivered as soon
as it is launched.
"""

from __future__ import annotations

import logging
import sys
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Optional, Protocol, cast

import numpy as np

if TYPE_CHECKING:

    from pipeline.backends import FeaturesBackend, InferenceBackend
from pipeline.batching import Batcher
from pipeline.embeddings import pooled, wants_embedding, wants_predictions
from pipeline.errors import TransientError
from pipeline.items import Pixels, Prepared
from pipeline.predictions import (
    Prediction,
    Record,
    error_record,
    mean_over_views,
    ok_record,
    softmax,
    top_k_of_probabilities,
)

Remember = Callable[[Prepared, list[Prediction]], None]
# logits, and features when asked for: NumPy arrays, or torch tensors on the device
Outputs = tuple[Any, Optional[Any]]
Results = tuple[list[list[Prediction]], Optional[np.ndarray]]  # per image; embeddings
log = logging.getLogger("imgpipe.inference")
IDLE_S = 0.5


class Pending(Protocol):
    """A launched batch's results: per-image predictions and embeddings."""

    @property
    def in_flight(self) -> bool: ...  # worth collecting only after the next launch

    def collect(self) -> Results: ...


@dataclass
class OnHostAlready:
    """Results a backend computed on the host (NumPy): nothing to wait for."""

    results: Results
    in_flight: bool = False

    def collect(self) -> Results:
        return self.results


@dataclass
class Flight:
    """A batch launched by `InferenceLoop.launch`, for `InferenceLoop.collect`."""

    batch: Sequence[Prepared]
    ready: list[Prepared]  # the items the model scores (not answered, not failed)
    pending: Optional[Pending] = None
    launch_s: float = 0.0
    staging_s: float = 0.0

    @property
    def in_flight(self) -> bool:
        return self.pending is not None and self.pending.in_flight


class InferenceLoop:
    """Scores batches of Prepared items with one inference backend."""

    def __init__(self, backend: InferenceBackend, topk: int,
                 remember: Optional[Remember] = None, default_topk: Optional[int] = None,
                 model_name: Optional[str] = None, normalize_embeddings: bool = True,
                 overlap: bool = True) -> None:
        self.backend = backend
        # Collect a batch after launching the next: a GPU then works on one while the
        # host stages the other. On the CPU the work is done by then, and holding it
        # back would only delay its answer by a batch.
        self.overlap = overlap
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
        return self.collect(self.launch(batch))

    def launch(self, batch: Sequence[Prepared]) -> Flight:
        """Start scoring every view of every item that needs the model in one
        model batch; `collect` waits for it."""
        ready = [item for item in batch if item.error is None and item.predictions is None]
        if not ready:
            return Flight(batch, ready)
        started = time.perf_counter()
        pending = self._launch(ready)
        return Flight(batch, ready, pending, time.perf_counter() - started,
                      self.backend.last_staging_s)

    def collect(self, flight: Flight) -> list[Record]:
        """The launched batch's records, one per item, in its order: an item's
        prediction is the mean of its views' softmax probabilities (one view: its
        own), and its embedding the mean of their features."""
        if flight.pending is not None:
            self._deliver(flight)
        return [error_record(item) if item.error is not None
                else ok_record(item, self.model_name, self._kept(item)) for item in flight.batch]

    def _kept(self, item: Prepared) -> list[Prediction]:
        return (item.predictions or [])[:item.job.topk or self.default_topk]

    def _launch(self, ready: list[Prepared]) -> Pending:
        samples: list[Pixels] = []
        views: list[int] = []
        for item in ready:
            assert item.pixels is not None
            stacked = item.pixels.ndim == 4  # a TTA item: views x C x H x W
            samples.extend(item.pixels if stacked else [item.pixels])
            views.append(item.pixels.shape[0] if stacked else 1)
        logits, features = self._outputs(samples, any(wants_embedding(item.output)
                                                      for item in ready))
        labels = self.backend.model.labels
        if isinstance(logits, np.ndarray):  # computed on the host (ONNX Runtime on the CPU)
            probs = mean_over_views(softmax(logits), views)
            return OnHostAlready((top_k_of_probabilities(probs, self.topk, labels),
                                  None if features is None
                                  else pooled(features, views, self.normalize_embeddings)))
        # Imported here: a run on the CPU default's ONNX export never imports torch.
        from pipeline.backends.reduce import reduce_on_device

        return reduce_on_device(logits, features, views, self.topk, labels,
                                self.normalize_embeddings)

    def _deliver(self, flight: Flight) -> None:
        assert flight.pending is not None
        started = time.perf_counter()
        predictions, embeddings = flight.pending.collect()
        ready = flight.ready
        # The batch's own time: its launch and the wait for its results.
        per_item_ms = (flight.launch_s + time.perf_counter() - started) * 1000 / len(ready)
        h2d_ms = flight.staging_s * 1000 / len(ready)
        for index, (item, top) in enumerate(zip(ready, predictions, strict=True)):
            item.timings_ms["h2d"] = h2d_ms
            item.timings_ms["inference"] = per_item_ms
            item.predictions = top if wants_predictions(item.output) else []
            if embeddings is not None and wants_embedding(item.output):
                item.embedding = embeddings[index]
            if self.remember is not None:
                self.remember(item, item.predictions)
        self.batches += 1

    def _outputs(self, pixels: list[Pixels], features: bool) -> Outputs:
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
        joined = None if first is None or second is None else _joined(torch, first, second)
        return _joined(torch, logits, more), joined

    def _run(self, pixels: list[Pixels], features: bool) -> Outputs:
        """Outputs as the backend gives them: tensors stay on the device."""
        if not features:
            return self.backend.predict(pixels), None
        # The engine builds a backend with features whenever model.output asks for them.
        return cast("FeaturesBackend", self.backend).predict_features(pixels)

    def drain(self, batcher: Batcher[Prepared], sink: Callable[[list[Record]], None],
              idle: Callable[[], None] = lambda: None) -> None:
        """Score batches until the batcher reports the end of its input; `idle` is
        called whenever half a second passes with nothing to score or deliver.

        A batch still on the device is collected once the next one is launched,
        when the batcher has nothing more at once, at the end of the input, or
        when a launch fails (then before the error goes on)."""
        flight: Optional[Flight] = None
        try:
            while (batch := batcher.next_batch(
                    timeout_s=IDLE_S if flight is None else 0.0)) is not None:
                if not batch and flight is None:
                    idle()
                    continue
                launched = self.launch(batch) if batch else None
                if flight is not None:
                    done, flight = flight, None
                    sink(self.collect(done))
                if launched is not None and launched.in_flight and self.overlap:
                    flight = launched
                elif launched is not None:
                    sink(self.collect(launched))
        finally:
            if flight is not None:
                sink(self.collect(flight))


def _joined(torch: Any, first: Any, second: Any) -> Any:
    """Two halves' outputs as one: on the device for tensors, else NumPy's."""
    if isinstance(first, np.ndarray):
        return np.concatenate([first, second])
    return torch.cat([first, second])
