"""InferenceLoop: a batch too big for the device is halved, not failed; batch N+1
is launched before batch N is collected, and records still come out in order."""

from __future__ import annotations

import queue
import threading

import numpy as np
import pytest
import torch

from pipeline.backends import TorchBackend
from pipeline.batching import END, Batcher
from pipeline.errors import InputError, TransientError
from pipeline.inference import InferenceLoop
from pipeline.items import Job, Prepared, Record
from pipeline.models import LoadedModel
from pipeline.predictions import to_numpy
from tests.builders import MeanColour

SHAPE = (3, 8, 8)


class FitsAtMost(torch.nn.Module):
    """MeanColour, but a batch over `limit` raises CUDA's out-of-memory error."""

    def __init__(self, limit: int) -> None:
        super().__init__()
        self.limit = limit
        self.inner = MeanColour()
        self.batch_sizes: list[int] = []

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        self.batch_sizes.append(x.shape[0])
        if x.shape[0] > self.limit:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory (simulated)")
        return self.inner(x)


def worker_with(limit: int) -> tuple[InferenceLoop, FitsAtMost]:
    module = FitsAtMost(limit)
    model = LoadedModel("fits", module, (0.0, 0.0, 0.0), (1.0, 1.0, 1.0),
                        [str(i) for i in range(1000)], "digest")
    backend = TorchBackend(model, torch.device("cpu"), 8, SHAPE)
    module.limit = 8  # warm-up runs whole batches
    backend.setup()
    module.limit, module.batch_sizes = limit, []
    return InferenceLoop(backend, topk=1), module


def items(count: int) -> list[Prepared]:
    return [Prepared(Job(f"{i}.png"), pixels=np.full(SHAPE, i, dtype=np.uint8))
            for i in range(count)]


def test_a_batch_that_runs_out_of_memory_is_scored_in_halves():
    worker, module = worker_with(limit=2)
    records = worker.score(items(8))
    assert [r["status"] for r in records] == ["ok"] * 8
    assert module.batch_sizes == [8, 4, 2, 2, 4, 2, 2]
    # the halves give the same answers as one batch does (up to float rounding)
    module.limit = 8
    for halved, whole in zip(records, worker.score(items(8)), strict=True):
        assert halved["predictions"][0]["index"] == whole["predictions"][0]["index"]
        assert halved["predictions"][0]["score"] == pytest.approx(
            whole["predictions"][0]["score"], abs=1e-5)


def test_a_single_image_that_does_not_fit_is_a_transient_error():
    worker, _ = worker_with(limit=0)
    with pytest.raises(TransientError, match="out of device memory"):
        worker.score(items(1))


# --- pipelining: batch N+1 is launched before batch N is collected -----------


class Recording:
    """A backend that notes each launch (the first sample's value names the batch),
    around a real one; `as_numpy` answers on the host, as ONNX Runtime does."""

    def __init__(self, backend: TorchBackend, events: list[str], as_numpy: bool = False,
                 fail_at: int = -1) -> None:
        self.backend, self.events, self.as_numpy, self.fail_at = (backend, events, as_numpy,
                                                                   fail_at)

    def __getattr__(self, name: str) -> object:
        return getattr(self.backend, name)

    def predict(self, samples: list[np.ndarray]) -> object:
        first = int(samples[0].flat[0])
        if first == self.fail_at:
            raise RuntimeError("device error (simulated)")
        self.events.append(f"launch {first}")
        logits = self.backend.predict(samples)
        return to_numpy(logits) if self.as_numpy else logits


def recording_loop(events: list[str], as_numpy: bool = False, fail_at: int = -1,
                   remember=None, like: InferenceLoop | None = None,
                   overlap: bool = True) -> InferenceLoop:
    """A loop over a fresh MeanColour model, or over the model of loop `like`."""
    backend = like.backend.backend if like is not None else worker_with(limit=8)[0].backend
    return InferenceLoop(Recording(backend, events, as_numpy, fail_at),  # type: ignore
                         topk=3, remember=remember, overlap=overlap)


def queued(batch_items: list[Prepared], end: bool = True) -> queue.Queue[object]:
    source: queue.Queue[object] = queue.Queue()
    for item in batch_items:
        source.put(item)
    if end:
        source.put(END)
    return source


def batcher(source: queue.Queue[object]) -> Batcher[Prepared]:
    return Batcher(source, max_batch_size=4, max_delay_ms=0, more_coming=lambda: False)


def collecting(events: list[str], delivered: list[Record]):
    def sink(records: list[Record]) -> None:
        events.append(f"collect {records[0]['path'].split('.')[0]}")
        delivered.extend(records)
    return sink


def comparable(records: list[Record]) -> list[tuple]:
    return [(r["path"], r["status"], [(p["index"], p["label"]) for p in r.get("predictions", [])])
            for r in records]


def test_the_next_batch_is_launched_before_the_last_one_is_collected():
    # given three batches of four waiting, and the input's end
    events: list[str] = []
    loop = recording_loop(events)

    # when the loop drains them
    loop.drain(batcher(queued(items(12))), collecting(events, []))

    # then each batch is collected only once the next one was launched, the last at the end
    assert events == ["launch 0", "launch 4", "collect 0", "launch 8", "collect 4", "collect 8"]


def test_without_overlap_each_batch_is_delivered_before_the_next_is_launched():
    # given a loop that does not overlap batches (the engine's on the CPU, where
    # holding a finished batch back would only delay its answer)
    events: list[str] = []
    loop = recording_loop(events, overlap=False)

    # when it drains three batches of four, then each is collected as soon as launched
    loop.drain(batcher(queued(items(12))), collecting(events, []))
    assert events == ["launch 0", "collect 0", "launch 4", "collect 4", "launch 8", "collect 8"]


def test_pipelined_records_are_in_order_and_those_of_the_synchronous_host_path():
    # given twelve images, one of them failed in preprocessing and one answered by the cache
    batch = items(12)
    batch[5] = Prepared(Job("5.png"), error=InputError("worker_crashed", "gone"))
    batch[6].predictions = [{"label": "cached", "index": 1, "score": 1.0}]
    remembered: list[str] = []
    loop = recording_loop([], remember=lambda item, top: remembered.append(item.job.path))

    # when the loop drains them pipelined, and a loop answering on the host scores
    # the same batches one at a time
    delivered: list[Record] = []
    loop.drain(batcher(queued(batch)), collecting([], delivered))
    synchronous = recording_loop([], as_numpy=True, like=loop)
    expected = [record for start in (0, 4, 8)
                for record in synchronous.score(items(12)[start:start + 4])]

    # then there is one record per input, in order, with the host path's predictions
    assert [r["path"] for r in delivered] == [f"{i}.png" for i in range(12)]
    assert delivered[5]["status"] == "error"
    assert delivered[6]["predictions"] == [{"label": "cached", "index": 1, "score": 1.0}]
    kept = [i for i in range(12) if i not in (5, 6)]
    assert comparable([delivered[i] for i in kept]) == comparable([expected[i] for i in kept])
    for i in kept:
        assert [p["score"] for p in delivered[i]["predictions"]] == pytest.approx(
            [p["score"] for p in expected[i]["predictions"]], abs=1e-6)
        assert set(delivered[i]["timings_ms"]) >= {"h2d", "inference"}
    assert remembered == [f"{i}.png" for i in kept]


def test_a_batch_in_flight_is_delivered_when_the_input_goes_idle():
    # given a loop draining an open input that holds one batch
    source = queued(items(4), end=False)
    delivered: list[Record] = []
    arrived, idled = threading.Event(), threading.Event()
    loop = recording_loop([])

    def sink(records: list[Record]) -> None:
        delivered.extend(records)
        arrived.set()

    drainer = threading.Thread(target=loop.drain, args=(batcher(source), sink, idled.set))
    drainer.start()
    try:
        # when nothing more comes, then the batch is delivered without waiting for
        # another one, or the input's end, and the loop goes idle after it
        assert arrived.wait(timeout=2.0), "the batch in flight was held back"
        assert [r["path"] for r in delivered] == [f"{i}.png" for i in range(4)]
        assert idled.wait(timeout=2.0)
    finally:
        source.put(END)
        drainer.join(timeout=5.0)
    assert not drainer.is_alive()


def test_a_failed_launch_delivers_the_batch_before_it_then_raises():
    # given two batches, the second of which the device fails
    events: list[str] = []
    delivered: list[Record] = []
    loop = recording_loop(events, fail_at=4)

    # when the loop drains them, then the error goes on
    with pytest.raises(RuntimeError, match="simulated"):
        loop.drain(batcher(queued(items(8))), collecting(events, delivered))

    # after the first batch was delivered, as it was before batches overlapped
    assert [r["path"] for r in delivered] == [f"{i}.png" for i in range(4)]
    assert events == ["launch 0", "collect 0"]


def test_a_host_backend_delivers_each_batch_as_soon_as_it_is_scored():
    # given a backend that answers on the host (ONNX Runtime's NumPy arrays)
    events: list[str] = []
    loop = recording_loop(events, as_numpy=True)

    # when the loop drains two batches
    loop.drain(batcher(queued(items(8))), collecting(events, []))

    # then nothing is held back: there is no device work to overlap
    assert events == ["launch 0", "collect 0", "launch 4", "collect 4"]
