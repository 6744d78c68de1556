"""What this CPU's instruction set makes slow or wrong, from /proc/cpuinfo.

Two judgements depend on it: whether bf16 is worth running on the CPU (only
with native bf16 instructions; emulated, it ran 12x slower than fp32 on an
AMD EPYC with AVX2 only), and whether int8 weights must keep to 7 bits
(without VNNI, ONNX Runtime's x86 kernels multiply uint8 by int8 with AVX2's
pmaddubsw, whose int16 pair sums saturate).
"""

from __future__ import annotations

import functools
from typing import Optional

# x86 flags of bf16 arithmetic, and Arm's (Features: "bf16").
BF16_FLAGS = frozenset({"avx512_bf16", "amx_bf16", "bf16"})
# x86 flags of an 8-bit dot product into 32 bits, which cannot saturate.
VNNI_FLAGS = frozenset({"avx512_vnni", "avx_vnni", "amx_int8"})


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The instruction-set flags of the first CPU (x86 "flags", Arm "Features");
    empty where /proc/cpuinfo is absent."""
    try:
        with open("/proc/cpuinfo", encoding="ascii", errors="replace") as info:
            line = next((line for line in info
                         if line.startswith(("flags", "Features"))), "")
    except OSError:
        return frozenset()
    return frozenset(line.partition(":")[2].split())


def native_bf16(flags: Optional[frozenset[str]] = None) -> bool:
    """Whether the CPU computes in bf16 itself rather than emulating it."""
    return bool((cpu_flags() if flags is None else flags) & BF16_FLAGS)


def needs_reduced_int8_range(flags: Optional[frozenset[str]] = None) -> bool:
    """Whether int8 weights must keep to 7 bits: AVX2 without VNNI. On an AMD EPYC
    (AVX2 only), full-range weights moved EfficientNet-Lite0's top probability
    by up to 0.53 and changed one top-1 in six photographs."""
    flags = cpu_flags() if flags is None else flags
    return "avx2" in flags and not flags & VNNI_FLAGS
