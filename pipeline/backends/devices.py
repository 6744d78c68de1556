"""Which CUDA device a backend runs on, and making it current where it matters.

A CUDA device is always named with its index, and every CUDA call that uses
the thread's current device (pinned buffers, events, the caching allocator)
runs under `on_device`: the current device is per thread and starts as GPU
0, so without it a model on cuda:N opens a stray context on GPU 0.
"""

from __future__ import annotations

import contextlib
from typing import Any

import torch

from pipeline.errors import ModelLoadError


def resolve_device(requested: str) -> torch.device:
    """"auto" means the first CUDA device when there is one, else the CPU; a CUDA
    device always has its index ("cuda" is cuda:0), so that nothing later falls
    back to whichever device is current."""
    if requested == "auto":
        requested = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(requested)
    if device.type != "cuda":
        return device
    if not torch.cuda.is_available():
        raise ModelLoadError(f"device {requested!r} requested but CUDA is not available")
    index = device.index or 0
    if index >= torch.cuda.device_count():
        raise ModelLoadError(f"device {requested!r} requested but there are "
                             f"{torch.cuda.device_count()} CUDA devices")
    return torch.device("cuda", index)


def on_device(device: torch.device) -> contextlib.AbstractContextManager[Any]:
    """`device` made the calling thread's current CUDA device for a block.

    Pinned buffers, events and the caching allocator use the current device,
    which is per thread and starts as GPU 0: the engine may call predict() from a
    thread other than setup()'s."""
    return torch.cuda.device(device) if device.type == "cuda" else contextlib.nullcontext()
