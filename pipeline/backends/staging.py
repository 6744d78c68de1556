"""A fixed ring of host buffers that feeds the inference device.

Buffers are allocated once. On a GPU they are pinned, copies are
non-blocking, and a slot is reused only after a CUDA event says the copy out
of it finished. On the CPU the same code runs without pinning or copies. A batch may be
padded to more rows than it has samples (a fixed batch size on the device);
the padding rows are zeros or an earlier batch's pixels, never uninitialised
memory.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np
import torch


class StagingRing:
    """`slots` uint8 buffers of shape (max_batch_size, *sample_shape)."""

    def __init__(self, slots: int, max_batch_size: int,
                 sample_shape: tuple[int, ...], device: torch.device) -> None:
        if slots < 2:
            raise ValueError("a staging ring needs at least 2 slots")
        self.device = device
        self.on_gpu = device.type == "cuda"
        shape = (max_batch_size, *sample_shape)
        self.buffers = [torch.zeros(shape, dtype=torch.uint8, pin_memory=self.on_gpu)
                        for _ in range(slots)]
        self.events = [torch.cuda.Event() if self.on_gpu else None for _ in range(slots)]
        self.next_slot = 0

    def stage(self, samples: Sequence[np.ndarray], rows: int = 0) -> torch.Tensor:
        """Copy samples into the next free slot; return `rows` rows of it (at least
        the samples) on the device."""
        rows = max(rows, len(samples))
        if not samples or rows > self.buffers[0].shape[0]:
            raise ValueError(f"batch of {rows} does not fit the ring")
        slot = self.next_slot
        self.next_slot = (slot + 1) % len(self.buffers)
        event = self.events[slot]
        if event is not None:
            event.synchronize()  # the previous copy out of this slot is done
        host = self.buffers[slot][:rows]
        np.stack(samples, out=host[: len(samples)].numpy())
        if not self.on_gpu:
            return host
        on_device = host.to(self.device, non_blocking=True)
        assert event is not None
        # On this device's stream: a bare record() uses the current device's,
        # which is GPU 0 in a thread that never chose one.
        event.record(torch.cuda.current_stream(self.device))
        return on_device
