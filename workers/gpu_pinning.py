"""systemd drop-ins that pin each `imgpipe@N` instance to its GPU's NUMA-local cores.

`nvidia-smi topo -m` says which cores and NUMA node are local to each GPU.
GPUs that share a set of cores (several GPUs on one socket) split it evenly:
each range of the set (e.g. the physical cores 0-47 and their hyperthread
siblings 96-143) is cut into as many contiguous parts as there are GPUs, and
instance N takes part N of every range, so siblings stay together. Each
drop-in sets `CPUAffinity=` (the daemon's default worker and thread counts
follow it) and binds memory to the GPU's NUMA node.

    nvidia-smi topo -m | python -m workers.gpu_pinning            # print them
    nvidia-smi topo -m | python -m workers.gpu_pinning --write /etc/systemd/system
    systemctl daemon-reload

Rows are GPU indices; the units are numbered by device minor number (`nvidia-smi
-q`, "Minor Number"), which is the index on most hosts: check before writing.
"""

from __future__ import annotations

import argparse
import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path
from typing import Optional

ANSI = re.compile(r"\x1b\[[0-9;]*m")
DROP_IN = "imgpipe@{gpu}.service.d/cpus.conf"


@dataclass(frozen=True)
class GpuTopology:
    gpu: int
    cpus: tuple[tuple[int, int], ...]  # inclusive ranges, as nvidia-smi lists them
    numa_node: Optional[int]  # None when nvidia-smi reports N/A


def parse_topology(text: str) -> list[GpuTopology]:
    """The GPUs of `nvidia-smi topo -m` output with their CPU and NUMA affinity;
    ValueError when the table is not there."""
    lines = [ANSI.sub("", line) for line in text.splitlines()]
    header_index = next((i for i, line in enumerate(lines) if "CPU Affinity" in line), None)
    if header_index is None:
        raise ValueError("no 'CPU Affinity' column: is this `nvidia-smi topo -m` output?")
    header = [cell.strip() for cell in lines[header_index].split("\t")]
    cpu_column, numa_column = header.index("CPU Affinity"), header.index("NUMA Affinity")
    gpus = []
    for line in lines[header_index + 1:]:
        cells = [cell.strip() for cell in line.split("\t")]
        if not re.fullmatch(r"GPU\d+", cells[0]):
            continue
        numa = cells[numa_column]
        gpus.append(GpuTopology(int(cells[0][3:]), _ranges(cells[cpu_column]),
                                int(numa) if numa.isdigit() else None))
    return gpus


def _ranges(text: str) -> tuple[tuple[int, int], ...]:
    ranges = []
    for part in text.split(","):
        first, _, last = part.strip().partition("-")
        ranges.append((int(first), int(last or first)))
    return tuple(ranges)


def pinned_cpus(gpus: list[GpuTopology]) -> dict[int, str]:
    """Each GPU's share of its local cores, as a CPUAffinity= list ("0-7,96-103")."""
    sharing: dict[tuple[tuple[int, int], ...], list[int]] = defaultdict(list)
    for gpu in gpus:
        sharing[gpu.cpus].append(gpu.gpu)
    shares = {}
    for cpus, members in sharing.items():
        for position, index in enumerate(sorted(members)):
            parts = [_part(first, last, position, len(members)) for first, last in cpus]
            shares[index] = ",".join(f"{a}-{b}" if a != b else str(a)
                                     for a, b in parts if a <= b)
    return shares


def _part(first: int, last: int, position: int, count: int) -> tuple[int, int]:
    """Part `position` of `count` near-equal contiguous parts of first..last."""
    size = last - first + 1
    start = first + size * position // count
    return start, first + size * (position + 1) // count - 1


def drop_in(cpus: str, numa_node: Optional[int]) -> str:
    lines = ["# Written by `python -m workers.gpu_pinning`: this GPU's NUMA-local cores.",
             "[Service]", f"CPUAffinity={cpus}"]
    if numa_node is not None:
        lines += ["NUMAPolicy=bind", f"NUMAMask={numa_node}"]
    return "\n".join(lines) + "\n"


def main(argv: Optional[list[str]] = None) -> int:
    parser = argparse.ArgumentParser(description=(__doc__ or "").splitlines()[0])
    parser.add_argument("--write", type=Path, metavar="DIR",
                        help="write DIR/imgpipe@N.service.d/cpus.conf (else print them)")
    args = parser.parse_args(argv)
    try:
        gpus = parse_topology(sys.stdin.read())
    except ValueError as exc:
        print(f"gpu_pinning: {exc}", file=sys.stderr)
        return 2
    shares = pinned_cpus(gpus)
    for gpu in gpus:
        text = drop_in(shares[gpu.gpu], gpu.numa_node)
        name = DROP_IN.format(gpu=gpu.gpu)
        if args.write is None:
            print(f"# {name}\n{text}")
            continue
        path = args.write / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
