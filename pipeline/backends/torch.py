"""PyTorch backends: eager (channels_last) or `torch.compile`d, in fp32, bf16 or fp16.

bf16 and fp16 convert a copy of the weights to that dtype once, at setup,
and run it on input of that dtype, without autocast: autocast casts the fp32
weights again on every call, which made fp16 slower than fp32 on an H200 at
batch 32 (5,288 against 6,869 images/s). The loaded model itself stays fp32,
for the fp32 reference and the exports built from it. The uint8 input is
normalised in fp32 and only then cast; the outputs come back as fp32.

`torch.compile` uses inductor, whose compiled kernels are kept under the
artifact directory (``inductor/``): a restart traces the model again but
reuses the generated code.
"""

from __future__ import annotations

import copy
import os
import time
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any, Optional

import torch

from pipeline.backends.devices import on_device
from pipeline.backends.staging import StagingRing
from pipeline.cores import usable_cores
from pipeline.errors import ModelLoadError
from pipeline.items import Pixels
from pipeline.models import LoadedModel
from pipeline.models.features import WithFeatures
from pipeline.timing import warm_up

RING_BATCHES_AHEAD = 1
# On a GPU a batch is padded to the next of these sizes (and max_batch_size), each
# warmed up at setup: cudnn.benchmark autotunes every new input shape, which
# stalled the first batch of each size the batcher emits (1 to max) for up to a
# second or more.
GPU_BATCH_BUCKETS = (1, 8, 32, 128)
CUDNN_BENCHMARK = True
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
INDUCTOR_CACHE_ENV = "TORCHINDUCTOR_CACHE_DIR"


def batch_buckets(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes a GPU runs for batches up to `max_batch_size`."""
    return tuple(sorted({size for size in GPU_BATCH_BUCKETS if size < max_batch_size}
                        | {max_batch_size}))


class TorchBackend:
    """Runs a LoadedModel on one device. Heavy work happens in setup().

    `compile_cache` set means `torch.compile`, its kernels kept there; with
    `graphs`, in CUDA graphs (mode "reduce-overhead"): each batch bucket is
    captured at warm-up and replayed as one launch.
    `embeddings` names the setting that asks for features (predict_features);
    a model without a head to take them from is a ModelLoadError naming it.
    With features, the module run (and compiled) is `WithFeatures`: one graph
    gives both outputs, and predict() keeps the logits.
    """

    def __init__(self, model: LoadedModel, device: torch.device, max_batch_size: int,
                 sample_shape: tuple[int, int, int], threads: int = 0, *,
                 precision: str = "fp32", compile_cache: Optional[Path] = None,
                 embeddings: Optional[str] = None, graphs: bool = False) -> None:
        if precision not in DTYPES:
            raise ModelLoadError(f"torch runs fp32, bf16 or fp16, not {precision!r}")
        self.model = model
        # Made here, not in setup(): a model that cannot give them fails at once.
        self.featured = WithFeatures(model, embeddings) if embeddings is not None else None
        self.embeddings = embeddings
        # Indexed, as resolve_device gives it: torch.cuda.set_device refuses a bare "cuda".
        self.device = torch.device("cuda", 0) if device == torch.device("cuda") else device
        self.max_batch_size = max_batch_size
        self.sample_shape = sample_shape
        self.threads = threads
        self.precision = precision
        self.dtype = DTYPES[precision]  # of the weights and of the input the model sees
        self.compile_cache = compile_cache
        if graphs and compile_cache is None:
            raise ValueError("CUDA graphs come from torch.compile: give a compile_cache")
        self.graphs = graphs
        self.name = ("torch-graphs" if graphs else
                     "torch-compile" if compile_cache is not None else "torch")
        self.warmup_s = 0.0
        # CPU: every batch as it comes (no autotuning to stall, padding only costs).
        self.buckets = batch_buckets(max_batch_size) if self.device.type == "cuda" else ()
        self.last_staging_s = 0.0  # the last batch's copy into the staging ring (and to the device)

    def setup(self) -> None:
        """Move to the device, build the staging ring, compile if asked, warm up."""
        if self.device.type == "cpu":
            torch.set_num_threads(self.threads or usable_cores())
        if self.device.type == "cuda":
            # The current device is per thread and defaults to GPU 0: make it ours, so
            # that nothing (streams, events, caching allocator) opens a context there.
            torch.cuda.set_device(self.device)
            torch.backends.cudnn.benchmark = CUDNN_BENCHMARK
            # fp32 means fp32: cuDNN's TF32 convolutions moved probabilities by 1.2e-3
            # from the CPU's (4e-7 without) for no measurable speed on an H200 at batch 32.
            torch.backends.cudnn.allow_tf32 = False
        module = self._placed()
        self.module = module if self.featured is None else self.featured
        if self.compile_cache is not None:
            self.module = self._compiled(self.module, self.compile_cache)
        shape = (1, 3, 1, 1)
        self.scale = (1.0 / torch.tensor(self.model.std)).reshape(shape).to(self.device)
        self.shift = (-torch.tensor(self.model.mean) * self.scale.cpu().flatten()
                      ).reshape(shape).to(self.device)
        self.ring = StagingRing(RING_BATCHES_AHEAD + 2, self.max_batch_size,
                                self.sample_shape, self.device)
        # With torch.compile, batch 1 gets its own graph; the second size >= 2
        # compiles the dynamic-batch one, so no real batch waits for a compile.
        sizes = self.buckets or sorted({1, self.max_batch_size, min(2, self.max_batch_size)})
        self.warmup_s = warm_up(self.predict, self.sample_shape, sizes)
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def _placed(self) -> torch.nn.Module:
        """The module to run: on the device, channels_last, its weights in `dtype`."""
        if self.dtype == torch.float32:
            module = self.model.module.to(self.device)
        else:
            module = self._converted_copy().module.to(self.device, self.dtype)
        return module.to(memory_format=torch.channels_last)

    def _converted_copy(self) -> LoadedModel:
        """The model with a copy of its module, to be converted: the loaded one stays fp32
        for every other backend built from it. With features, the tap moves to the copy."""
        if self.featured is not None:
            self.featured.close()  # else its hook would be copied along, still its own
        model = replace(self.model, module=copy.deepcopy(self.model.module))
        if self.embeddings is not None:
            self.featured = WithFeatures(model, self.embeddings)
        return model

    def _compiled(self, module: Any, cache: Path) -> Any:
        if isinstance(self.model.module, torch.jit.ScriptModule):
            raise ModelLoadError("torch.compile cannot trace a TorchScript model; use "
                                 "backend torch, torchscript or onnxruntime")
        # Inductor reads this on every cache access. Assigned, not defaulted: torch
        # fills in a /tmp default the first time anything asks (loading a model may).
        os.environ[INDUCTOR_CACHE_ENV] = str(cache)
        # A graph's outputs live in memory the next replay overwrites: _forward copies them.
        return torch.compile(module, mode="reduce-overhead" if self.graphs else None)

    @torch.inference_mode()
    def predict(self, samples: Sequence[Pixels]) -> torch.Tensor:
        """uint8 CHW samples -> float logits on the device, one row per sample."""
        with on_device(self.device):
            return self._forward(samples)[0]

    @torch.inference_mode()
    def predict_features(self, samples: Sequence[Pixels]
                         ) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits, pooled penultimate features) on the device, one row per sample each."""
        if self.featured is None:
            raise RuntimeError("this backend was built without embeddings")
        with on_device(self.device):
            logits, features = self._forward(samples)
        return logits, features

    def _forward(self, samples: Sequence[Pixels]) -> tuple[torch.Tensor, ...]:
        """Stage and normalise the batch, run the model on it; each output's rows."""
        started = time.perf_counter()
        batch = self.ring.stage(samples, self._rows(len(samples)))
        self.last_staging_s = time.perf_counter() - started
        # Normalised in fp32, then cast: one rounding per pixel, not one per operation.
        x = batch.float().mul_(self.scale).add_(self.shift)
        result = self.module(x.to(self.dtype, memory_format=torch.channels_last))
        outputs = result if isinstance(result, tuple) else (result,)
        for output in outputs:
            if output.shape[0] != batch.shape[0]:
                raise RuntimeError(f"model returned {output.shape[0]} rows for "
                                   f"{batch.shape[0]} inputs")
        rows = tuple(output[: len(samples)].float() for output in outputs)
        return tuple(row.clone() for row in rows) if self.graphs else rows

    def _rows(self, count: int) -> int:
        """The batch size `count` samples run at: the next bucket on a GPU."""
        return next((size for size in self.buckets if size >= count), count)

    def close(self) -> None:
        if self.featured is not None:
            self.featured.close()
        self.__dict__.pop("module", None)
        self.__dict__.pop("ring", None)
