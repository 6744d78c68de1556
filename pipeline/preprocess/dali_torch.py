"""DALI's output handed to PyTorch where the model runs, without a host round trip.

With DALI decoding on the model's GPU, each batch's pixels are copied once,
device to device, from DALI's buffer into a tensor torch owns (the copy
DALI's own PyTorch iterator makes, feed_ndarray), on a stream of its own so
that it never waits behind the model's work. The rows of that tensor go to
the staging ring as they are (pipeline/backends/staging.py): no copy to the
host, no pickling, no copy back. The same code runs on the CPU, where the
tensor is in host memory, so the test suite covers it there.
"""

from __future__ import annotations

from typing import Any, Optional

import torch
from nvidia.dali.plugin.pytorch.torch_utils import feed_ndarray

from pipeline.backends.devices import on_device


class TorchOutput:
    """Copies DALI batches into torch tensors on `device` ("cpu" or "cuda:N")."""

    def __init__(self, device: str) -> None:
        self.device = torch.device(device)
        self.stream: Optional[torch.cuda.Stream] = None
        if self.device.type == "cuda":
            with on_device(self.device):
                self.stream = torch.cuda.Stream(self.device)

    def copy(self, batch: Any) -> torch.Tensor:
        """A dense DALI TensorList (on the CPU or on this device) as one uint8 tensor
        that torch owns: still valid once DALI's outputs are released. Its memory
        belongs to this stream; the staging ring records its own stream's use."""
        dense = batch.as_tensor()
        if self.stream is None:
            return feed_ndarray(dense, torch.empty(dense.shape(), dtype=torch.uint8))
        with on_device(self.device), torch.cuda.stream(self.stream):
            out = torch.empty(dense.shape(), dtype=torch.uint8, device=self.device)
            feed_ndarray(dense, out, cuda_stream=self.stream)
        # Only this copy is waited for, before DALI may reuse its buffer.
        self.stream.synchronize()
        return out
