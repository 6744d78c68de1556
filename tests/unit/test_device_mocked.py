"""A model on cuda:N names cuda:N in every CUDA call, from any thread: checked
without a GPU, on a stand-in for `torch.cuda` with two devices whose memory is
host memory. tests/gpu/test_device_index.py checks the same on two real GPUs.

The stand-in keeps a current device per thread (0 until a thread chooses, as
CUDA's does) and records, for each call that depends on a device (a move to
the device, a pinned buffer, an event, a synchronise), the device it named
and the one that was current.
"""

from __future__ import annotations

import contextlib
import threading
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from pipeline.backends import TorchBackend, resolve_device
from pipeline.backends.artifacts import ArtifactStore
from pipeline.backends.torchscript import TorchScriptBackend
from pipeline.errors import ModelLoadError
from pipeline.models import LoadedModel
from tests.builders import MeanColour

SHAPE = (3, 8, 8)
DEVICES = 2


@dataclass(frozen=True)
class Call:
    what: str
    named: int | None  # the device the call named; None: the current one
    current: int


@dataclass(frozen=True)
class Stream:
    index: int


class FakeCuda:
    """The parts of `torch.cuda` the torch backend uses, for DEVICES devices."""

    def __init__(self) -> None:
        self.local = threading.local()
        self.calls: list[Call] = []

    def current_device(self) -> int:
        return getattr(self.local, "index", 0)

    def note(self, what: str, named: Any = None) -> None:
        index = None if named is None else torch.device(named).index
        self.calls.append(Call(what, index, self.current_device()))

    def set_device(self, device: Any) -> None:
        self.note("set_device", device)
        self.local.index = torch.device(device).index

    @contextlib.contextmanager
    def device(self, device: Any) -> Iterator[None]:
        previous = self.current_device()
        self.local.index = torch.device(device).index
        try:
            yield
        finally:
            self.local.index = previous

    def current_stream(self, device: Any = None) -> Stream:
        return Stream(self.current_device() if device is None else torch.device(device).index)

    def synchronize(self, device: Any = None) -> None:
        self.note("synchronize", device)

    def Event(self) -> FakeEvent:  # noqa: N802 (torch.cuda.Event)
        return FakeEvent(self)

    def named_devices(self) -> set[int | None]:
        return {call.named for call in self.calls}

    def current_devices(self) -> set[int]:
        return {call.current for call in self.calls}


class FakeEvent:
    def __init__(self, cuda: FakeCuda) -> None:
        self.cuda = cuda

    def record(self, stream: Stream | None = None) -> None:
        self.cuda.note("event.record", f"cuda:{stream.index}" if stream else None)

    def synchronize(self) -> None:
        pass


@pytest.fixture
def cuda(monkeypatch: pytest.MonkeyPatch) -> FakeCuda:
    fake = FakeCuda()
    for name in ("set_device", "device", "current_device", "current_stream",
                 "synchronize", "Event"):
        monkeypatch.setattr(torch.cuda, name, getattr(fake, name))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: DEVICES)
    for flag in ("benchmark", "allow_tf32"):  # set by setup(); restored after the test
        monkeypatch.setattr(torch.backends.cudnn, flag, getattr(torch.backends.cudnn, flag))
    _host_memory_for_device_memory(monkeypatch, fake)
    return fake


def _host_memory_for_device_memory(monkeypatch: pytest.MonkeyPatch, fake: FakeCuda) -> None:
    """Moves to a CUDA device, tensors made there and pinned buffers are noted, then
    made on the host."""
    tensor_to, module_to, zeros = torch.Tensor.to, torch.nn.Module.to, torch.zeros

    def on_host(args: tuple[Any, ...], kwargs: dict[str, Any]) -> tuple[tuple, dict]:
        def host(value: Any) -> Any:
            if isinstance(value, (str, torch.device)) and torch.device(value).type == "cuda":
                fake.note("to", value)
                return torch.device("cpu")
            return value
        return tuple(host(a) for a in args), {k: host(v) for k, v in kwargs.items()}

    def to_tensor(self: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        args, kwargs = on_host(args, kwargs)
        return tensor_to(self, *args, **kwargs)

    def to_module(self: torch.nn.Module, *args: Any, **kwargs: Any) -> torch.nn.Module:
        args, kwargs = on_host(args, kwargs)
        return module_to(self, *args, **kwargs)

    def pinned_zeros(*args: Any, pin_memory: bool = False, **kwargs: Any) -> torch.Tensor:
        if pin_memory:
            fake.note("pinned")
        args, kwargs = on_host(args, kwargs)
        return zeros(*args, **kwargs)

    monkeypatch.setattr(torch.Tensor, "to", to_tensor)
    monkeypatch.setattr(torch.nn.Module, "to", to_module)
    monkeypatch.setattr(torch, "zeros", pinned_zeros)


def colours_model() -> LoadedModel:
    return LoadedModel("colours", MeanColour(), (0.0,) * 3, (1.0,) * 3,
                       [f"class {i}" for i in range(1000)], "digest")


def samples(count: int) -> list[np.ndarray]:
    return [np.full(SHAPE, index, dtype=np.uint8) for index in range(count)]


@pytest.mark.parametrize(("requested", "resolved"), [
    ("auto", "cuda:0"), ("cuda", "cuda:0"), ("cuda:0", "cuda:0"), ("cuda:1", "cuda:1")])
def test_a_cuda_device_always_gets_its_index(cuda: FakeCuda, requested: str,
                                              resolved: str) -> None:
    assert resolve_device(requested) == torch.device(resolved)


def test_a_device_beyond_the_last_is_refused_naming_how_many_there_are(
        cuda: FakeCuda) -> None:
    with pytest.raises(ModelLoadError, match="cuda:2.*there are 2 CUDA devices"):
        resolve_device("cuda:2")


def test_a_model_on_cuda_1_names_cuda_1_in_every_call_from_any_thread(
        cuda: FakeCuda) -> None:
    # given a model set up on cuda:1 in this thread
    backend = TorchBackend(colours_model(), resolve_device("cuda:1"), 8, SHAPE)
    backend.setup()
    set_up = len(cuda.calls)

    # when another thread, whose current device is still 0, scores three batches
    def score() -> None:
        for size in (1, 8, 3):
            backend.predict(samples(size))
    thread = threading.Thread(target=score)
    thread.start()
    thread.join()

    # then setup chose cuda:1, and every call in either thread named it or ran under it
    assert Call("set_device", 1, 0) == cuda.calls[0]
    assert {"to", "pinned", "event.record", "synchronize"} <= {c.what for c in cuda.calls}
    assert cuda.named_devices() <= {1, None}
    assert cuda.current_devices() - {0} == {1}
    assert all(call.current == 1 for call in cuda.calls[1:])
    scoring = cuda.calls[set_up:]
    assert [c.what for c in scoring].count("event.record") == 3


def test_a_scoring_thread_keeps_its_own_current_device(cuda: FakeCuda) -> None:
    # given a model set up on cuda:1
    backend = TorchBackend(colours_model(), resolve_device("cuda:1"), 8, SHAPE)
    backend.setup()
    seen: list[int] = []

    # when a thread that works on GPU 0 scores a batch
    def score() -> None:
        backend.predict(samples(2))
        seen.append(torch.cuda.current_device())
    thread = threading.Thread(target=score)
    thread.start()
    thread.join()

    # then its current device is GPU 0 again afterwards
    assert seen == [0]


def test_a_torchscript_model_on_cuda_1_names_cuda_1_in_every_call_from_any_thread(
        cuda: FakeCuda, monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    # given the frozen artifact loaded onto cuda:1 (the stand-in maps it to the host)
    jit_load = torch.jit.load

    def load(path: str, map_location: Any = None) -> Any:
        cuda.note("to", map_location)
        return jit_load(path, map_location="cpu")
    monkeypatch.setattr(torch.jit, "load", load)
    backend = TorchScriptBackend(colours_model(), resolve_device("cuda:1"), 8, SHAPE,
                                 store=ArtifactStore(tmp_path))
    backend.setup()

    # when another thread, whose current device is still 0, scores a batch
    thread = threading.Thread(target=lambda: backend.predict(samples(3)))
    thread.start()
    thread.join()

    # then every call, at setup and in the scoring thread, named cuda:1 or ran under it
    assert {"to", "pinned", "event.record"} <= {c.what for c in cuda.calls}
    assert cuda.named_devices() <= {1, None}
    assert cuda.current_devices() == {1}
