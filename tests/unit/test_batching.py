"""Batcher: full batches at once, partial ones after max_delay_ms, END ends."""

from __future__ import annotations

import queue
import threading
import time

import pytest

from pipeline.batching import END, Batcher


def filled(*items: object) -> queue.Queue:
    source: queue.Queue = queue.Queue()
    for item in items:
        source.put(item)
    return source


def timed(batcher: Batcher, timeout_s: float | None = None) -> tuple[object, float]:
    started = time.monotonic()
    batch = batcher.next_batch(timeout_s)
    return batch, time.monotonic() - started


@pytest.mark.parametrize(("size", "delay"), [(0, 10), (-1, 10), (4, -1), (4, -0.5)])
def test_invalid_limits_are_refused(size, delay):
    with pytest.raises(ValueError, match="max_batch_size|max_delay_ms"):
        Batcher(queue.Queue(), max_batch_size=size, max_delay_ms=delay)


def test_zero_delay_and_batch_of_one_are_valid():
    batcher = Batcher(filled("a", "b"), max_batch_size=1, max_delay_ms=0)
    assert batcher.next_batch(0.1) == ["a"]
    assert batcher.next_batch(0.1) == ["b"]


def test_queued_items_fill_a_batch_immediately():
    # given ten items already waiting and a long delay
    batcher = Batcher(filled(*range(10)), max_batch_size=4, max_delay_ms=10_000)

    # when batches are taken
    first, first_s = timed(batcher)
    second, second_s = timed(batcher)

    # then full batches come at once, in order, without waiting for the delay
    assert first == [0, 1, 2, 3]
    assert second == [4, 5, 6, 7]
    assert first_s < 1.0 and second_s < 1.0


def test_partial_batch_is_returned_after_the_delay_when_the_queue_goes_quiet():
    # given three items and room for eight
    batcher = Batcher(filled("a", "b", "c"), max_batch_size=8, max_delay_ms=50)

    # when
    batch, elapsed = timed(batcher)

    # then the batch closes about max_delay_ms after its first item
    assert batch == ["a", "b", "c"]
    assert 0.040 <= elapsed < 1.0


def test_items_arriving_during_the_delay_join_the_batch():
    # given one item now and one 50 ms later, a 2-item batch and a 5 s delay
    source = filled("first")
    timer = threading.Timer(0.05, source.put, args=("second",))
    timer.start()
    batcher = Batcher(source, max_batch_size=2, max_delay_ms=5_000)

    # when
    try:
        batch, elapsed = timed(batcher)
    finally:
        timer.cancel()

    # then the late item joins, and the batch closes as soon as it is full
    assert batch == ["first", "second"]
    assert elapsed < 2.0


def test_delay_starts_when_the_first_item_arrives():
    # given an empty queue that gets an item after 150 ms, and a 100 ms delay
    source: queue.Queue = queue.Queue()
    timer = threading.Timer(0.15, source.put, args=("late",))
    timer.start()
    batcher = Batcher(source, max_batch_size=8, max_delay_ms=100)

    # when the batcher waits
    batch, elapsed = timed(batcher, timeout_s=5.0)

    # then the idle time before the first item does not count against the delay
    assert batch == ["late"]
    assert elapsed >= 0.15 + 0.09


def test_end_sentinel_flushes_the_partial_batch_then_ends():
    # given two items followed by END
    batcher = Batcher(filled("a", "b", END), max_batch_size=8, max_delay_ms=10_000)

    # when
    batch, elapsed = timed(batcher)

    # then the partial batch comes without waiting for the delay, then None for good
    assert batch == ["a", "b"]
    assert elapsed < 1.0
    assert batcher.next_batch(0.01) is None
    assert batcher.next_batch(0.01) is None


def test_end_on_an_empty_queue_ends_at_once():
    batcher = Batcher(filled(END), max_batch_size=8, max_delay_ms=10)
    assert batcher.next_batch() is None
    assert batcher.ended


def test_end_right_after_a_full_batch():
    batcher = Batcher(filled("a", "b", END), max_batch_size=2, max_delay_ms=10)
    assert batcher.next_batch() == ["a", "b"]
    assert batcher.next_batch(0.5) is None


def test_empty_queue_with_a_timeout_gives_an_empty_batch():
    # given nothing queued
    batcher = Batcher(queue.Queue(), max_batch_size=4, max_delay_ms=10)

    # when
    batch, elapsed = timed(batcher, timeout_s=0.05)

    # then an empty batch (not None: the stream has not ended) after the timeout
    assert batch == []
    assert 0.04 <= elapsed < 1.0
    assert not batcher.ended


def test_batcher_works_across_threads():
    # given a producer thread putting 100 items then END
    source: queue.Queue = queue.Queue(maxsize=8)

    def produce() -> None:
        for index in range(100):
            source.put(index)
        source.put(END)

    producer = threading.Thread(target=produce, daemon=True)
    producer.start()
    batcher = Batcher(source, max_batch_size=16, max_delay_ms=5)

    # when the consumer drains it
    seen: list[int] = []
    while (batch := batcher.next_batch(2.0)) is not None:
        assert len(batch) <= 16
        seen.extend(batch)
    producer.join(timeout=5)

    # then every item came once, in order
    assert seen == list(range(100))


def test_a_partial_batch_goes_at_once_when_nothing_more_is_coming():
    # given one item queued, a long delay, and nothing else on its way
    batcher = Batcher(filled("lone"), max_batch_size=8, max_delay_ms=10_000,
                      more_coming=lambda: False)

    # when
    batch, elapsed = timed(batcher)

    # then it is not held back for the delay
    assert batch == ["lone"]
    assert elapsed < 1.0


def test_a_partial_batch_waits_while_more_is_coming():
    # given one item queued and a second one on its way (arriving after 100 ms)
    source = filled("first")
    coming = threading.Event()
    coming.set()

    def arrive() -> None:
        source.put("second")
        coming.clear()

    threading.Timer(0.1, arrive).start()
    batcher = Batcher(source, max_batch_size=8, max_delay_ms=5_000, more_coming=coming.is_set)

    # when
    batch, elapsed = timed(batcher)

    # then the batch waited for it, and went as soon as nothing more was coming
    assert batch == ["first", "second"]
    assert 0.09 <= elapsed < 2.0


def test_an_item_that_would_overflow_the_batch_opens_the_next_one():
    # given items weighing 2, 3 and 2 views against a batch of 4, then END
    weights = {"a": 2, "b": 3, "c": 2}
    batcher = Batcher(filled("a", "b", "c", END), max_batch_size=4, max_delay_ms=10_000,
                      weight=weights.__getitem__)

    # when batches are taken
    batches = [timed(batcher) for _ in range(4)]

    # then no item is split or dropped, each overflow waits for the next batch,
    # and none of them waits out the delay
    assert [batch for batch, _ in batches] == [["a"], ["b"], ["c"], None]
    assert all(elapsed < 1.0 for _, elapsed in batches)


def test_items_that_fill_the_batch_exactly_go_together_at_once():
    weights = {"a": 2, "b": 2, "c": 1}
    batcher = Batcher(filled("a", "b", "c"), max_batch_size=4, max_delay_ms=10_000,
                      weight=weights.__getitem__)
    batch, elapsed = timed(batcher)
    assert batch == ["a", "b"] and elapsed < 1.0
