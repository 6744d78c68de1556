"""Dynamic batching: fill up to max_batch_size, wait at most max_delay_ms."""

from __future__ import annotations

import queue
import time
from collections.abc import Callable
from typing import Generic, Optional, TypeVar

T = TypeVar("T")

END = object()  # put on the queue once, after the last item
WAIT_SLICE_S = 0.002  # how often `more_coming` is asked while a batch fills


class Batcher(Generic[T]):
    """Pulls items from a bounded queue and groups them into batches.

    The delay starts when a batch's first item arrives (a monotonic
    deadline), so an idle pipeline adds no latency and a busy one fills
    batches immediately. `more_coming` says whether anything is on its way to
    the queue; once nothing is, waiting out the delay cannot fill the batch,
    so it goes at once (a lone job at low load pays no batching delay).

    `weight` is what an item counts against `max_batch_size` (the views the
    model scores for it, with test-time augmentation; 1 by default). An item
    is never split: one that would overflow the batch opens the next one.
    """

    def __init__(self, source: queue.Queue[object], max_batch_size: int,
                 max_delay_ms: float, more_coming: Callable[[], bool] = lambda: True,
                 weight: Callable[[T], int] = lambda item: 1) -> None:
        if max_batch_size < 1:
            raise ValueError(f"max_batch_size must be >= 1, got {max_batch_size}")
        if max_delay_ms < 0:
            raise ValueError(f"max_delay_ms must be >= 0, got {max_delay_ms}")
        self.source = source
        self.max_batch_size = max_batch_size
        self.max_delay_s = max_delay_ms / 1000.0
        self.more_coming = more_coming
        self.weight = weight
        self.ended = False
        self._held: Optional[T] = None  # the item that did not fit the last batch

    def next_batch(self, timeout_s: Optional[float] = None) -> Optional[list[T]]:
        """The next batch; [] if nothing came within timeout_s; None at the end."""
        if self._held is not None:
            first: object = self._held
            self._held = None
        elif self.ended:
            return None
        else:
            try:
                first = self.source.get(timeout=timeout_s)
            except queue.Empty:
                return []
            if first is END:
                self.ended = True
                return None
        batch: list[T] = [first]  # type: ignore[list-item]
        size = self.weight(first)  # type: ignore[arg-type]
        deadline = time.monotonic() + self.max_delay_s
        while size < self.max_batch_size and not self.ended:
            item = self._get_until(deadline)
            if item is None:
                break
            if item is END:
                self.ended = True
                break
            weight = self.weight(item)  # type: ignore[arg-type]
            if size + weight > self.max_batch_size:
                self._held = item  # type: ignore[assignment]
                break
            batch.append(item)  # type: ignore[arg-type]
            size += weight
        return batch

    def _get_until(self, deadline: float) -> object:
        """The next item, or None once the deadline passed or nothing more is coming."""
        while True:
            try:
                return self.source.get_nowait()
            except queue.Empty:
                pass
            remaining = deadline - time.monotonic()
            if remaining <= 0 or not self.more_coming():
                return None
            try:
                return self.source.get(timeout=min(remaining, WAIT_SLICE_S))
            except queue.Empty:
                continue
