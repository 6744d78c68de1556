"""Drop-ins that pin each imgpipe@N to its GPU's NUMA-local cores, from nvidia-smi."""

from __future__ import annotations

import io
import sys
from pathlib import Path

import pytest

from workers import gpu_pinning

# As an H200 host printed it (ANSI underline on the header, a doubled tab before N/A).
ONE_GPU = ("\t\x1b[4mGPU0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\x1b[0m\n"
           "GPU0\t X \t0-15\t0\t\tN/A\n\nLegend:\n\n  X    = Self\n")
# Four GPUs on two sockets, hyperthreads numbered after the physical cores, and a NIC.
FOUR_GPUS = (
    "\tGPU0\tGPU1\tGPU2\tGPU3\tNIC0\tCPU Affinity\tNUMA Affinity\tGPU NUMA ID\n"
    "GPU0\t X \tNV18\tNV18\tNV18\tPXB\t0-23,48-71\t0\t\tN/A\n"
    "GPU1\tNV18\t X \tNV18\tNV18\tSYS\t0-23,48-71\t0\t\tN/A\n"
    "GPU2\tNV18\tNV18\t X \tNV18\tSYS\t24-47,72-95\t1\t\tN/A\n"
    "GPU3\tNV18\tNV18\tNV18\t X \tSYS\t24-47,72-95\t1\t\tN/A\n"
    "NIC0\tPXB\tSYS\tSYS\tSYS\t X \t\t\t\t\n")


def test_one_gpu_gets_all_its_local_cores_and_its_numa_node():
    (gpu,) = gpu_pinning.parse_topology(ONE_GPU)
    assert gpu == gpu_pinning.GpuTopology(0, ((0, 15),), 0)
    assert gpu_pinning.pinned_cpus([gpu]) == {0: "0-15"}
    assert gpu_pinning.drop_in("0-15", 0).splitlines()[1:] == [
        "[Service]", "CPUAffinity=0-15", "NUMAPolicy=bind", "NUMAMask=0"]


def test_gpus_on_one_socket_split_its_cores_keeping_hyperthread_siblings_together():
    gpus = gpu_pinning.parse_topology(FOUR_GPUS)
    assert [(g.gpu, g.numa_node) for g in gpus] == [(0, 0), (1, 0), (2, 1), (3, 1)]
    assert gpu_pinning.pinned_cpus(gpus) == {
        0: "0-11,48-59", 1: "12-23,60-71", 2: "24-35,72-83", 3: "36-47,84-95"}


def test_uneven_shares_cover_every_core_once():
    gpus = [gpu_pinning.GpuTopology(n, ((0, 9),), None) for n in range(3)]
    shares = gpu_pinning.pinned_cpus(gpus)
    assert shares == {0: "0-2", 1: "3-5", 2: "6-9"}
    assert "NUMAPolicy" not in gpu_pinning.drop_in(shares[0], None)  # N/A: no binding


def test_write_puts_one_drop_in_per_instance(tmp_path: Path, monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO(FOUR_GPUS))
    assert gpu_pinning.main(["--write", str(tmp_path)]) == 0
    written = sorted(p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.conf"))
    assert written == [f"imgpipe@{n}.service.d/cpus.conf" for n in range(4)]
    assert "CPUAffinity=36-47,84-95" in (tmp_path / written[3]).read_text()


def test_other_input_is_a_one_line_error(monkeypatch, capsys):
    monkeypatch.setattr(sys, "stdin", io.StringIO("No devices were found\n"))
    assert gpu_pinning.main([]) == 2
    assert "no 'CPU Affinity' column" in capsys.readouterr().err


@pytest.mark.parametrize("text, expected", [("0-15", ((0, 15),)), ("3", ((3, 3),)),
                                            ("0-3,8-11", ((0, 3), (8, 11)))])
def test_cpu_lists_parse(text, expected):
    assert gpu_pinning._ranges(text) == expected
