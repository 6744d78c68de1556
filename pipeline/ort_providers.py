"""Which ONNX Runtime execution providers a session asks for, and with what options.

On a GPU: TensorRT first where it is installed, its engines kept under the
artifact directory; CUDA next; the CPU for any node neither takes. Both GPU
providers run on one CUDA stream the caller made, so that staging the batch,
the model and the top-k after it are ordered on one queue
(pipeline/backends/binding.py). On the CPU: the CPU provider alone.

Nothing here imports torch or onnxruntime.
"""

from __future__ import annotations

import ctypes.util
import importlib.util
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional

TENSORRT = "TensorrtExecutionProvider"
CUDA = "CUDAExecutionProvider"
CPU = "CPUExecutionProvider"
GPU_PROVIDERS = (TENSORRT, CUDA)
HAS_STREAM, STREAM = "has_user_compute_stream", "user_compute_stream"
# The `cpu` and `gpu` extras' requirements (pyproject.toml, which says why these).
CPU_WHEEL = "onnxruntime>=1.18,<2"
GPU_WHEEL = "onnxruntime-gpu>=1.27,<2"
WHEELS = ("onnxruntime", "onnxruntime-gpu")  # both install the `onnxruntime` package


@dataclass(frozen=True)
class OnGpu:
    """Where a session runs on a GPU: the CUDA device's index, the CUDA stream its
    providers run on (a cudaStream_t as an integer; 0 leaves ONNX Runtime its own),
    and the directory for TensorRT's engines (None: no TensorRT)."""

    device: int
    stream: int = 0
    tensorrt_cache: Optional[Path] = None


def install_commands(python: str, wheel: str) -> str:
    """Shell commands that leave `python` with `wheel` alone. Both wheels go first:
    removing one deletes the files they share, so a wheel left installed would be
    "already satisfied" with its files gone."""
    return (f"{python} -m pip uninstall -y {' '.join(WHEELS)} && "
            f"{python} -m pip install '{wheel}'")


def providers_for(available: Sequence[str], gpu: Optional[OnGpu], input_name: str,
                  max_batch_size: int, sample_shape: tuple[int, ...]) -> list[Any]:
    """The `providers` argument of an InferenceSession, best first."""
    if gpu is None or CUDA not in available:
        return [CPU]
    providers: list[Any] = [(CUDA, _cuda_options(gpu)), CPU]
    if gpu.tensorrt_cache is not None and TENSORRT in available and tensorrt_installed():
        shapes = _profile(input_name, max_batch_size, sample_shape)
        providers.insert(0, (TENSORRT, _tensorrt_options(gpu, gpu.tensorrt_cache, shapes)))
    return providers


def without_tensorrt(providers: Sequence[Any]) -> list[Any]:
    return [entry for entry in providers if _name(entry) != TENSORRT]


def asks_for_tensorrt(providers: Sequence[Any]) -> bool:
    return any(_name(entry) == TENSORRT for entry in providers)


def tensorrt_installed() -> bool:
    """TensorRT's libraries, system-wide or from the `tensorrt` wheel: onnxruntime-gpu
    lists its TensorRT provider whether or not they are there, and without them
    ONNX Runtime drops the provider with a warning on every start."""
    return (ctypes.util.find_library("nvinfer") is not None
            or importlib.util.find_spec("tensorrt_libs") is not None)


def runs_on_stream(providers: Sequence[str], options: Mapping[str, Mapping[str, str]],
                   stream: int) -> bool:
    """Whether every GPU provider of a session reports running on `stream`. Not when
    ONNX Runtime fell back to a provider's defaults after it failed to start."""
    gpu = [name for name in providers if name in GPU_PROVIDERS]
    return bool(gpu) and all(_reports(options.get(name, {}), stream) for name in gpu)


def _reports(options: Mapping[str, str], stream: int) -> bool:
    # CUDA reports the stream's address; TensorRT only the flag.
    return options.get(HAS_STREAM) == "1" and options.get(STREAM, str(stream)) == str(stream)


def _stream(gpu: OnGpu) -> dict[str, str]:
    # The flag too: some releases and providers read it rather than infer it from the stream.
    return {HAS_STREAM: "1", STREAM: str(gpu.stream)} if gpu.stream else {}


def _cuda_options(gpu: OnGpu) -> dict[str, str]:
    # fp32 means fp32, as in the torch backends: no TF32 convolutions or matrix products.
    return {"device_id": str(gpu.device), "use_tf32": "0", **_stream(gpu)}


def _profile(input_name: str, max_batch_size: int, sample_shape: tuple[int, ...]
             ) -> tuple[str, str]:
    """TensorRT's shapes for the smallest and the largest batch."""
    sample = "x".join(str(size) for size in sample_shape)
    return f"{input_name}:1x{sample}", f"{input_name}:{max_batch_size}x{sample}"


def _tensorrt_options(gpu: OnGpu, cache: Path, shapes: tuple[str, str]) -> dict[str, str]:
    smallest, largest = shapes
    return {
        "device_id": str(gpu.device),
        # Engines take minutes to build: kept, a restart loads them.
        "trt_engine_cache_enable": "True", "trt_engine_cache_path": str(cache),
        "trt_timing_cache_enable": "True", "trt_timing_cache_path": str(cache),
        # One engine for every batch from 1 to the largest: without a profile TensorRT
        # builds again whenever a batch is larger than any before it.
        "trt_profile_min_shapes": smallest, "trt_profile_opt_shapes": largest,
        "trt_profile_max_shapes": largest,
        **_stream(gpu),
    }


def _name(entry: Any) -> str:
    return entry[0] if isinstance(entry, tuple) else str(entry)
