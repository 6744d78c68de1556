"""ONNX Runtime with I/O binding: the batch in, the outputs out, as torch tensors on one device.

The uint8 batch is staged to the device through a `StagingRing` and bound to
the graph's input by address; each output is bound to a tensor allocated for
the batch on the same device. So the logits (and features) stay where the
model left them, for `reduce_on_device`, as the torch backends' do: no host
round trip. The device is named by type and index alone, so the same code
runs on the CPU, where ONNX Runtime reads and writes host memory.

Streams, on a GPU. ONNX Runtime's CUDA and TensorRT providers run on the
stream given as `user_compute_stream` (pipeline/ort_providers.py): here, one
torch made for the session, not torch's default stream, whose null handle
ONNX Runtime reads as none given. The copy in, the model and the output
tensors' allocations are all queued on it, and each run is told not to wait
for the device at its end, so `run` returns before the GPU has finished.
Ordering is by the streams alone: the session's stream waits for the
caller's before a run (earlier readers of memory it reuses), and the
caller's stream waits for the session's after it, so whatever the caller
queues next (the top-k on the device) reads the outputs only once ONNX
Runtime has written them. Not ONNX Runtime's own stream with
`synchronize_inputs`/`synchronize_outputs` or its end-of-run synchronisation:
those make the host wait for the device on every batch, and the inference
loop stages batch N+1 while the device runs batch N.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any, Optional

import numpy as np
import torch

from pipeline.backends.devices import on_device
from pipeline.backends.staging import StagingRing
from pipeline.items import Pixels

RING_SLOTS = 3  # as TorchBackend's ring: a batch staged ahead of the one in flight, and one more
# Without this, ONNX Runtime synchronises the device with the host at the end of each run.
ASYNC_RUN = "disable_synchronize_execution_providers"
DTYPES = {"tensor(float)": (torch.float32, np.float32),
          "tensor(float16)": (torch.float16, np.float16)}


class BoundSession:
    """Runs an InferenceSession on `device` with its input and outputs bound to torch
    tensors there; on a CUDA device, on `stream`, which its providers were given."""

    def __init__(self, session: Any, device: torch.device, max_batch_size: int,
                 sample_shape: tuple[int, int, int],
                 stream: Optional[torch.cuda.Stream] = None) -> None:
        import onnxruntime as ort

        if device.type == "cuda" and stream is None:
            raise ValueError("a session bound on a CUDA device needs the stream it runs on")
        self.session = session
        self.device = device
        self.stream = stream
        self.max_batch_size = max_batch_size
        self.binding = session.io_binding()
        self.input_name = session.get_inputs()[0].name
        self.rows = {output.name: _row(output) for output in session.get_outputs()}
        with on_device(device):  # its pinned buffers belong to the session's GPU
            self.ring = StagingRing(RING_SLOTS, max_batch_size, sample_shape, device)
        self.run_options = ort.RunOptions()
        if stream is not None:
            self.run_options.add_run_config_entry(ASYNC_RUN, "1")
        self.last_staging_s = 0.0  # the last batch's copy into the ring (and to the device)

    def run(self, samples: Sequence[Pixels], names: Sequence[str]
            ) -> tuple[torch.Tensor, ...]:
        """uint8 CHW samples -> the named outputs on the device, one row per sample."""
        if not samples or len(samples) > self.max_batch_size:
            raise ValueError(f"batch of {len(samples)} does not fit max_batch_size "
                             f"{self.max_batch_size}")
        if self.stream is None:
            return self._run(samples, names)
        # Under the session's device: predict() may be called from any thread.
        with on_device(self.device):
            caller = torch.cuda.current_stream(self.device)
            self.stream.wait_stream(caller)  # earlier readers of the memory this run reuses
            with torch.cuda.stream(self.stream):
                outputs = self._run(samples, names)
            caller.wait_stream(self.stream)  # the caller's next kernels read finished outputs
        return outputs

    def _run(self, samples: Sequence[Pixels], names: Sequence[str]
             ) -> tuple[torch.Tensor, ...]:
        """Stage, bind and run on the current stream (the session's, on a GPU)."""
        started = time.perf_counter()
        batch = self.ring.stage(samples)
        self.last_staging_s = time.perf_counter() - started
        outputs = self._bind(batch, names)
        self.session.run_with_iobinding(self.binding, self.run_options)
        return outputs

    def _bind(self, batch: torch.Tensor, names: Sequence[str]) -> tuple[torch.Tensor, ...]:
        """Bind `batch` and a new tensor per output (from torch's caching allocator on a
        GPU). Not one buffer for every batch: a caller may hold a batch's outputs while
        the next batch runs, as the inference loop does with the halves of a batch too
        big for the device's memory."""
        # An output bound for an earlier run would be written again, at its old address.
        self.binding.clear_binding_inputs()
        self.binding.clear_binding_outputs()
        kind, index = self.device.type, self.device.index or 0
        self.binding.bind_input(self.input_name, kind, index, np.uint8, tuple(batch.shape),
                                batch.data_ptr())
        outputs = []
        for name in names:
            row, dtype, element_type = self.rows[name]
            shape = (batch.shape[0], *row)
            output = torch.empty(shape, dtype=dtype, device=self.device)
            self.binding.bind_output(name, kind, index, element_type, shape, output.data_ptr())
            outputs.append(output)
        return tuple(outputs)


def _row(output: Any) -> tuple[tuple[int, ...], torch.dtype, type]:
    """An output's shape past the batch dimension, and its torch and NumPy types."""
    row = tuple(output.shape[1:])
    if not all(isinstance(size, int) for size in row) or output.type not in DTYPES:
        raise ValueError(f"output {output.name!r} is {output.type} {list(output.shape)}: "
                         f"binding needs a fixed shape past the batch and a float type")
    dtype, element_type = DTYPES[output.type]
    return row, dtype, element_type
