"""The CPU judgements that choose precisions, on the flags of CPUs the project meets."""

from __future__ import annotations

import pytest

from pipeline.cpu_features import cpu_flags, native_bf16, needs_reduced_int8_range

AVX2_ONLY = frozenset({"sse4_2", "avx2", "fma"})  # an AMD EPYC of the Zen 2 era
SKYLAKE = frozenset({"avx2", "avx512f", "avx512bw"})  # AVX-512 without VNNI
CASCADE_LAKE = frozenset({"avx2", "avx512f", "avx512_vnni"})
SAPPHIRE_RAPIDS = frozenset({"avx2", "avx512_vnni", "avx512_bf16", "amx_bf16", "amx_int8"})
ALDER_LAKE = frozenset({"avx2", "avx_vnni"})
NEOVERSE_V1 = frozenset({"fp", "asimd", "asimddp", "bf16"})  # Arm Features


@pytest.mark.parametrize(("flags", "reduced"), [
    (AVX2_ONLY, True), (SKYLAKE, True), (CASCADE_LAKE, False), (SAPPHIRE_RAPIDS, False),
    (ALDER_LAKE, False), (NEOVERSE_V1, False), (frozenset(), False)])
def test_int8_weights_keep_to_7_bits_only_where_the_cpu_lacks_vnni(flags, reduced):
    assert needs_reduced_int8_range(flags) is reduced


@pytest.mark.parametrize(("flags", "native"), [
    (AVX2_ONLY, False), (SKYLAKE, False), (CASCADE_LAKE, False), (SAPPHIRE_RAPIDS, True),
    (ALDER_LAKE, False), (NEOVERSE_V1, True), (frozenset(), False)])
def test_bf16_is_native_only_with_bf16_instructions(flags, native):
    assert native_bf16(flags) is native


def test_this_machine_has_flags_to_judge_by():
    # /proc/cpuinfo names the instruction set on every Linux machine tests run on
    assert cpu_flags() and ({"avx2", "sse2"} & cpu_flags() or "asimd" in cpu_flags())
