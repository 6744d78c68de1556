"""Shared-memory slots that carry preprocessed pixels from the workers to the parent.

Pickling a 150 KB array through the executor's pipe costs a copy on each side
and two through the kernel, all of them serialised in the parent's one
result thread. Instead the parent (`PreprocessPool`) owns one segment cut
into equal slots, one per job its window can hold in flight (chunks in flight
x chunk size), each the size of one item of the spec's shape with the run's
TTA views. A chunk goes out with free slots; the worker copies each item's
pixels into one and returns only the item's metadata (`Placed`); the parent
copies the pixels out once when it collects the chunk and frees the chunk's
slots at once, whether the chunk succeeded or its worker crashed. An item
whose pixels do not fit a slot (a job asking for more views than the run's),
or that finds no free slot, travels pickled as before.

The parent alone unlinks the segment: at close, or through the resource
tracker when the parent dies. Workers attach without registering it there.
"""

from __future__ import annotations

import logging
import math
import os
import sys
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from multiprocessing import resource_tracker
from multiprocessing.shared_memory import SharedMemory
from typing import Optional

import numpy as np

from pipeline.errors import ConfigError
from pipeline.items import Prepared
from pipeline.spec import TTA_VIEWS, PreprocessSpec

HANDOFFS = ("auto", "pickle", "shared_memory")
# What "auto" takes where /dev/shm has room: the faster hand-off measured
# (benchmarks/README.md, "Hand-off from the preprocessing workers").
AUTO = "shared_memory"
SHM_DIR = "/dev/shm"
Placed = tuple[int, int, tuple[int, ...]]  # item index in its chunk, slot, pixels' shape
log = logging.getLogger("imgpipe.preprocess")


@dataclass(frozen=True)
class SlotLayout:
    """What a worker needs to attach: the segment's name and how it is cut."""

    name: str
    slots: int
    slot_bytes: int


def slot_bytes(spec: PreprocessSpec, tta: str) -> int:
    """Bytes of one item of `spec`'s shape with `tta`'s views."""
    return TTA_VIEWS.get(tta, 1) * math.prod(spec.output_shape)


def resolve_handoff(requested: str, size_bytes: int) -> str:
    """"pickle" or "shared_memory" for a segment of `size_bytes`. "auto" takes
    `AUTO` where /dev/shm has room for it and pickling where it has not (a
    write past a tmpfs's free space kills the writer with SIGBUS)."""
    if requested not in HANDOFFS:
        raise ConfigError(f"preprocess.handoff = {requested!r}; choose one of {HANDOFFS}")
    if requested == "pickle" or size_bytes == 0:
        return "pickle"
    room = _shm_room()
    if room is None or room >= size_bytes:
        return AUTO if requested == "auto" else requested
    if requested == "shared_memory":
        raise ConfigError(f"preprocess.handoff = 'shared_memory' needs {size_bytes >> 20} MiB "
                          f"of shared memory but {SHM_DIR} has {room >> 20} MiB free; enlarge "
                          f"it (docker run --shm-size), lower preprocess.workers or "
                          f"chunk_size, or choose 'pickle' or 'auto'")
    log.info("preprocess.handoff auto: pickling, %s has %d MiB free of the %d MiB needed",
             SHM_DIR, room >> 20, size_bytes >> 20)
    return "pickle"


def _shm_room() -> Optional[int]:
    """Free bytes of the shared-memory filesystem; None where there is none to ask."""
    try:
        stats = os.statvfs(SHM_DIR)
    except OSError:
        return None
    return stats.f_bavail * stats.f_frsize


class SlotRing:
    """The parent's side: `slots` slots of `slot_bytes`, free or lent to a chunk.

    Zero slots is a valid ring that never lends any (the pickle hand-off).
    Slots are lent by the thread mapping jobs and may be freed from the
    executor's (a chunk left behind frees its slots when it is done).
    """

    def __init__(self, slots: int, slot_bytes: int) -> None:
        self.slots, self.slot_bytes = slots, slot_bytes
        self.segment: Optional[SharedMemory] = None
        self._free: list[int] = []
        self._lock = threading.Lock()
        self.copied = 0  # items whose pixels came through a slot, for good

    def open(self) -> None:
        """Create the segment, once; every slot starts free."""
        if self.segment is None and self.slots > 0:
            self.segment = SharedMemory(create=True, size=self.slots * self.slot_bytes)
            self._free = list(range(self.slots - 1, -1, -1))

    @property
    def layout(self) -> Optional[SlotLayout]:
        if self.segment is None:
            return None
        return SlotLayout(self.segment.name, self.slots, self.slot_bytes)

    @property
    def free_count(self) -> int:
        return len(self._free)

    def take(self, count: int) -> list[int]:
        """Up to `count` free slots, now lent out (fewer, or none, when short)."""
        with self._lock:
            taken = self._free[len(self._free) - min(count, len(self._free)):]
            del self._free[len(self._free) - len(taken):]
        return taken

    def free(self, slots: Sequence[int]) -> None:
        with self._lock:
            self._free.extend(slots)

    def copy_out(self, prepared: Sequence[Prepared], placed: Sequence[Placed]) -> None:
        """Give each placed item its pixels back, copied out of its slot, so that
        the slot can be lent again at once."""
        assert self.segment is not None or not placed
        for index, slot, shape in placed:
            view = _view(self.segment, self.slot_bytes, slot, shape)  # type: ignore[arg-type]
            prepared[index].pixels = view.copy()
        self.copied += len(placed)

    def close(self) -> None:
        """Unlink the segment (no process can attach any more) and unmap it."""
        if self.segment is None:
            return
        segment, self.segment, self._free = self.segment, None, []
        segment.unlink()
        segment.close()


class SlotWriter:
    """A worker's side: the parent's segment, attached once."""

    def __init__(self, layout: SlotLayout) -> None:
        self.layout = layout
        self.segment = _attach_untracked(layout.name)

    def place(self, prepared: Sequence[Prepared], slots: Sequence[int]) -> list[Placed]:
        """Move the pixels of items that have them into `slots`, in order, while
        slots last; each placed item's pixels become None."""
        placed: list[Placed] = []
        lent = iter(slots)
        for index, item in enumerate(prepared):
            pixels = item.pixels
            if pixels is None or pixels.dtype != np.uint8 or pixels.nbytes > self.layout.slot_bytes:
                continue
            slot = next(lent, None)
            if slot is None:
                break
            np.copyto(_view(self.segment, self.layout.slot_bytes, slot, pixels.shape), pixels)
            item.pixels = None
            placed.append((index, slot, tuple(pixels.shape)))
        return placed


def _view(segment: SharedMemory, size: int, slot: int, shape: tuple[int, ...]) -> np.ndarray:
    return np.ndarray(shape, np.uint8, buffer=segment.buf, offset=slot * size)


def _attach_untracked(name: str) -> SharedMemory:
    """Attach to the parent's segment without registering it with the resource
    tracker, which the parent's workers share with it: the tracker would otherwise
    count it as this process's and unlink or warn about it on its own."""
    if sys.version_info >= (3, 13):
        return SharedMemory(name, track=False)
    register = resource_tracker.register
    resource_tracker.register = lambda name, rtype: None  # Python < 3.13 always registers
    try:
        return SharedMemory(name)
    finally:
        resource_tracker.register = register
