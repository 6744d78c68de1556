"""MergedSource: several shards' jobs into one engine, fairly, boundedly, and
never held up by one shard (in-memory shard sources; the real ones are in
tests/integration/test_shards.py)."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from typing import Optional

import pytest

from pipeline.items import Job
from pipeline.transport.sharded import MergedSource, split_ref
from tests.serve_daemon import wait_until

WAIT_S = 30.0


class Backlog:
    """An in-memory shard holding `chunks` chunks of two jobs each; a read waits
    while `gate` is clear (a stalled Redis) and may fail with `error`."""

    def __init__(self, name: str, chunks: int, gate: Optional[threading.Event] = None,
                 error: Optional[Exception] = None) -> None:
        self.chunks = [[Job(f"{name}-{c}-{j}", ref=f"{c + 1}-{j}") for j in range(2)]
                       for c in range(chunks)]
        self.gate = gate
        self.error = error
        self.reads = 0
        self.stopping = threading.Event()

    def setup(self) -> None:
        pass

    def stop(self) -> None:
        self.stopping.set()

    def next_chunk(self, wait_s: float) -> Optional[list[Job]]:
        if self.gate is not None:
            self.gate.wait()
        if self.error is not None:
            raise self.error
        if self.stopping.is_set():
            return None
        if not self.chunks:
            self.stopping.wait(min(wait_s, 0.05))
            return []
        self.reads += 1
        return self.chunks.pop(0)


@pytest.fixture
def gate() -> Iterator[threading.Event]:
    """A stalled shard's gate, opened after the test so its reader can end."""
    stalled = threading.Event()
    yield stalled
    stalled.set()


def names(chunk: Optional[list[Job]]) -> list[str]:
    assert chunk
    return [job.path for job in chunk]


def test_shards_take_turns_whatever_their_backlogs() -> None:
    # given a shard with a long backlog and one with a short one
    big, small = Backlog("big", 10), Backlog("small", 2)
    merged = MergedSource({0: big, 3: small})
    merged.start()
    # when chunks are taken, each once both shards have one ready
    taken = []
    for _ in range(4):
        wait_until(lambda: merged.ready() == 2, WAIT_S, "a chunk from each shard")
        taken.append(names(merged.next_chunk(0))[0])
    # then the shards alternate: the long backlog does not starve the short one
    assert taken == ["big-0-0", "small-0-0", "big-1-0", "small-1-0"]
    merged.stop()


def test_a_job_ref_names_its_shard_and_entry() -> None:
    merged = MergedSource({7: Backlog("only", 1)})
    merged.start()
    chunk = merged.next_chunk(WAIT_S)
    assert chunk and [split_ref(job.ref or "") for job in chunk] == [(7, "1-0"), (7, "1-1")]
    merged.stop()


def test_a_stalled_shard_holds_up_no_other(gate: threading.Event) -> None:
    # given a shard whose reads hang (its Redis stopped) and a live one
    stalled, live = Backlog("stalled", 5, gate=gate), Backlog("live", 3)
    merged = MergedSource({0: stalled, 1: live})
    merged.start()
    # then every chunk of the live shard comes through
    got = [names(merged.next_chunk(WAIT_S))[0] for _ in range(3)]
    assert got == ["live-0-0", "live-1-0", "live-2-0"]
    assert stalled.reads == 0


def test_a_shard_is_read_at_most_one_chunk_ahead() -> None:
    # given a shard with a backlog whose chunks nobody takes
    backlog = Backlog("ahead", 10)
    merged = MergedSource({0: backlog})
    merged.start()
    wait_until(lambda: merged.ready() == 1, WAIT_S, "one chunk ready")
    # then its reader holds that one and reads no further (one more at most,
    # waiting to be handed over)
    assert backlog.reads <= 2
    merged.next_chunk(0)
    wait_until(lambda: merged.ready() == 1, WAIT_S, "the next chunk ready")
    assert backlog.reads <= 3
    merged.stop()


def test_a_stop_hands_out_what_was_read_then_ends() -> None:
    backlog = Backlog("drained", 10)
    merged = MergedSource({0: backlog, 1: Backlog("empty", 0)})
    merged.start()
    wait_until(lambda: merged.ready() == 1, WAIT_S, "one chunk ready")
    # when stopped with a chunk read and not taken
    merged.stop()
    # then the chunks already read still come out, then the end, and nothing is lost
    chunks = []
    while (chunk := merged.next_chunk(WAIT_S)) is not None:
        chunks += [chunk] if chunk else []
    assert len(chunks) == backlog.reads and len(backlog.chunks) == 10 - backlog.reads


def test_a_shards_failure_reaches_the_engine() -> None:
    merged = MergedSource({0: Backlog("fine", 0), 1: Backlog("denied", 1,
                                                             error=RuntimeError("denied"))})
    merged.start()
    with pytest.raises(RuntimeError, match="denied"):
        for _ in range(100):
            merged.next_chunk(WAIT_S)
    merged.stop()
