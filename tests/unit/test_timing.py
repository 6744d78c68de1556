"""Model-only timings wait for the device: a GPU call returns once its work is queued."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import torch

from pipeline import timing

GPU_1 = torch.device("cuda", 1)


def test_each_timed_call_waits_for_its_output_on_the_device(monkeypatch):
    # given a call whose output is on cuda:1, and a device that records each wait
    events: list[str] = []
    monkeypatch.setattr(torch.cuda, "synchronize", lambda device: events.append(f"wait {device}"))

    def call() -> SimpleNamespace:
        events.append("call")
        return SimpleNamespace(device=GPU_1)

    # when it is timed
    latencies = timing.timed_calls(call, seconds=0.0)

    # then every call was followed by a wait for that device, before the next began
    assert len(latencies) == 3
    assert events == ["call", "wait cuda:1"] * 3


def test_outputs_on_the_host_are_not_waited_for(monkeypatch):
    waits: list[object] = []
    monkeypatch.setattr(torch.cuda, "synchronize", waits.append)
    for output in (torch.zeros(2), np.zeros(2), (torch.zeros(1), None)):
        assert timing.settled(output) is output
    assert waits == []
