"""A fixed ring of host buffers that feeds the inference device.

Buffers are allocated once. On a GPU they are pinned, copies are
non-blocking, and a slot is reused only after a CUDA event says the copy out
of it finished. On the CPU the same code runs without pinning or copies. A batch may be
padded to more rows than it has samples (a fixed batch size on the device);
the padding rows are zeros or an earlier batch's pixels, never uninitialised
memory.

Samples may also arrive as tensors on the ring's device already (DALI's output
on the model's GPU, pipeline/preprocess/dali_torch.py): those are gathered on
the device, and only the host samples beside them go through the ring.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence

import numpy as np
import torch

from pipeline.items import Pixels


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

    def stage(self, samples: Sequence[Pixels], rows: int = 0) -> torch.Tensor:
        """The samples as one batch of `rows` rows (at least the samples) on the
        device: host arrays copied through the next free slot, tensors already
        there gathered."""
        rows = max(rows, len(samples))
        if not samples or rows > self.buffers[0].shape[0]:
            raise ValueError(f"batch of {rows} does not fit the ring")
        on_host = [sample for sample in samples if isinstance(sample, np.ndarray)]
        if len(on_host) == len(samples):
            return self._through_slot(on_host, rows)
        return self._gathered(samples, rows)

    def _through_slot(self, samples: Sequence[np.ndarray], rows: int) -> torch.Tensor:
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

    def _gathered(self, samples: Sequence[Pixels], rows: int) -> torch.Tensor:
        """A new batch on the device: the samples there copied in on the device,
        those on the host through a slot, the padding zeroed."""
        there = {index: sample for index, sample in enumerate(samples)
                 if isinstance(sample, torch.Tensor)}
        here = {index: sample for index, sample in enumerate(samples)
                if isinstance(sample, np.ndarray)}
        for tensor in there.values():
            if tensor.device != self.device:
                raise ValueError(f"a sample on {tensor.device} for a ring on {self.device}")
        batch = torch.empty((rows, *self.buffers[0].shape[1:]), dtype=torch.uint8,
                            device=self.device)
        batch[self._rows(there.keys())] = torch.stack(list(there.values()))
        if here:
            batch[self._rows(here.keys())] = self._through_slot(list(here.values()), len(here))
        batch[len(samples):].zero_()
        if self.on_gpu:
            # Made on the producer's stream: the allocator must not hand their memory
            # out again until this stream's reads of it are done.
            for tensor in there.values():
                tensor.record_stream(torch.cuda.current_stream(self.device))
        return batch

    def _rows(self, indices: Iterable[int]) -> torch.Tensor:
        return torch.tensor(list(indices), device=self.device)
