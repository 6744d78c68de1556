"""An inference variant: a backend and the precision it computes in.

Written ``backend`` (fp32) or ``backend:precision``, e.g. ``onnxruntime:int8``.
What each backend supports:

============== ===================== ===================================================
backend        precisions            notes
============== ===================== ===================================================
torch          fp32, bf16, fp16      eager, channels_last; bf16/fp16 weights converted
                                     once at setup, no autocast
torch-compile  fp32, bf16, fp16      ``torch.compile`` (inductor) of the same, cached
                                     on disk
torch-graphs   fp32, bf16, fp16      ``torch.compile`` in CUDA graphs, one per batch size
torchscript    fp32                  traced and frozen once, kept as an artifact
onnxruntime    fp32, int8            int8: static, calibrated on real images
============== ===================== ===================================================

fp16 needs a CUDA device: on the CPU it runs, but EfficientNet-Lite0 was 8 to 29
times slower than in fp32 (batch 32, 2 AVX2 cores, a busy machine). bf16 needs a
CUDA device or a CPU with bf16 instructions: emulated, it ran 11 to 13 times
slower than fp32. int8 runs on ONNX Runtime's CPU provider only.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Optional

from pipeline.cpu_features import native_bf16
from pipeline.errors import ConfigError

if TYPE_CHECKING:  # torch is heavy; settings validation must not import it
    import torch

BACKENDS = ("torch", "torch-compile", "torch-graphs", "torchscript", "onnxruntime")
PRECISIONS = ("fp32", "bf16", "fp16", "int8")
SUPPORTED = {
    "torch": ("fp32", "bf16", "fp16"),
    "torch-compile": ("fp32", "bf16", "fp16"),
    "torch-graphs": ("fp32", "bf16", "fp16"),
    "torchscript": ("fp32",),
    "onnxruntime": ("fp32", "int8"),
}


@dataclass(frozen=True)
class Variant:
    backend: str
    precision: str = "fp32"

    @classmethod
    def parse(cls, text: str) -> Variant:
        """``"onnxruntime:int8"`` -> Variant; ConfigError naming what is wrong."""
        backend, _, precision = text.strip().partition(":")
        variant = cls(backend, precision or "fp32")
        variant.validate()
        return variant

    def validate(self) -> None:
        if self.backend not in SUPPORTED:
            raise ConfigError(f"unknown inference backend {self.backend!r} "
                              f"(choose from {', '.join(BACKENDS)})")
        if self.precision not in SUPPORTED[self.backend]:
            raise ConfigError(f"backend {self.backend} does not run in {self.precision!r} "
                              f"(it runs in {', '.join(SUPPORTED[self.backend])})")

    def unavailable(self, device: torch.device) -> Optional[str]:
        """Why this variant cannot run on `device`, or None when it can."""
        if self.backend == "torch-graphs" and device.type != "cuda":
            return f"{self} needs a CUDA device (CUDA graphs)"
        if self.precision == "fp16" and device.type != "cuda":
            return f"{self} needs a CUDA device (fp16 on the CPU is slower than fp32)"
        if self.precision == "bf16" and device.type == "cpu" and not native_bf16():
            return (f"{self} needs a GPU or a CPU with bf16 instructions (AVX512-BF16, AMX "
                    "or Arm BF16): emulated, it ran 12x slower than fp32")
        if self.precision == "int8" and device.type != "cpu":
            return f"{self} runs on the CPU only"
        return None

    def __str__(self) -> str:
        return self.backend if self.precision == "fp32" else f"{self.backend}:{self.precision}"


def candidates(device: torch.device) -> list[Variant]:
    """Every variant that can run on `device`: what `optimize` and `bench` sweep by default."""
    every = [Variant(backend, precision) for backend in BACKENDS
             for precision in SUPPORTED[backend]]
    return [variant for variant in every if variant.unavailable(device) is None]
