"""StagingRing on the CPU: buffers allocated once, reused round-robin."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from pipeline.backends.staging import StagingRing

CPU = torch.device("cpu")
SHAPE = (3, 8, 8)


def samples(count: int, start: int = 0) -> list[np.ndarray]:
    """`count` distinct uint8 CHW samples; sample i is filled with start + i."""
    return [np.full(SHAPE, start + index, dtype=np.uint8) for index in range(count)]


def test_stage_returns_the_samples_as_one_uint8_batch():
    # given a ring and three distinct samples
    ring = StagingRing(slots=2, max_batch_size=4, sample_shape=SHAPE, device=CPU)
    batch_in = [np.random.default_rng(i).integers(0, 256, SHAPE, dtype=np.uint8)
                for i in range(3)]

    # when they are staged
    staged = ring.stage(batch_in)

    # then the batch holds exactly those values, in order, on the CPU
    assert staged.shape == (3, *SHAPE)
    assert staged.dtype == torch.uint8
    assert staged.device == CPU
    np.testing.assert_array_equal(staged.numpy(), np.stack(batch_in))


def test_a_full_batch_fits():
    ring = StagingRing(slots=2, max_batch_size=4, sample_shape=SHAPE, device=CPU)
    staged = ring.stage(samples(4))
    assert [int(staged[i, 0, 0, 0]) for i in range(4)] == [0, 1, 2, 3]


def test_buffers_are_allocated_once_and_reused_round_robin():
    # given a ring of three slots
    slots = 3
    ring = StagingRing(slots=slots, max_batch_size=4, sample_shape=SHAPE, device=CPU)

    # when slots + 1 batches of varying size are staged
    pointers = []
    for call, size in enumerate([4, 2, 3, 1]):
        staged = ring.stage(samples(size, start=10 * call))
        pointers.append(staged.data_ptr())
        assert int(staged[0, 0, 0, 0]) == 10 * call

    # then each slot is its own buffer and the fourth batch reuses the first
    assert len(set(pointers[:slots])) == slots
    assert pointers[slots] == pointers[0]
    assert {p for p in pointers} == {buffer.data_ptr() for buffer in ring.buffers}


def test_a_reused_slot_holds_the_new_values():
    ring = StagingRing(slots=2, max_batch_size=2, sample_shape=SHAPE, device=CPU)
    ring.stage(samples(2, start=1))
    ring.stage(samples(2, start=5))
    third = ring.stage(samples(1, start=9))
    assert third.shape[0] == 1
    assert int(third[0].min()) == int(third[0].max()) == 9


def test_batch_larger_than_max_batch_size_is_refused():
    ring = StagingRing(slots=2, max_batch_size=4, sample_shape=SHAPE, device=CPU)
    with pytest.raises(ValueError, match="5"):
        ring.stage(samples(5))


def test_empty_batch_is_refused():
    ring = StagingRing(slots=2, max_batch_size=4, sample_shape=SHAPE, device=CPU)
    with pytest.raises(ValueError):
        ring.stage([])


def test_refused_batch_does_not_advance_the_ring():
    # given a ring whose next slot is slot 0
    ring = StagingRing(slots=2, max_batch_size=2, sample_shape=SHAPE, device=CPU)

    # when an oversized batch is refused, then a good one is staged
    with pytest.raises(ValueError):
        ring.stage(samples(3))
    staged = ring.stage(samples(1))

    # then the good one went into slot 0
    assert staged.data_ptr() == ring.buffers[0].data_ptr()


@pytest.mark.parametrize("slots", [0, 1])
def test_fewer_than_two_slots_is_refused(slots):
    with pytest.raises(ValueError, match="2 slots"):
        StagingRing(slots=slots, max_batch_size=4, sample_shape=SHAPE, device=CPU)


def test_sample_of_the_wrong_shape_is_refused():
    ring = StagingRing(slots=2, max_batch_size=4, sample_shape=SHAPE, device=CPU)
    with pytest.raises(ValueError):
        ring.stage([np.zeros((3, 8, 9), dtype=np.uint8)])


def test_a_padded_batch_has_the_samples_then_rows_that_were_never_uninitialised():
    ring = StagingRing(slots=2, max_batch_size=8, sample_shape=SHAPE, device=CPU)
    staged = ring.stage(samples(3, start=7), rows=8)
    assert staged.shape == (8, *SHAPE)
    assert [int(staged[i].min()) for i in range(3)] == [7, 8, 9]
    assert int(staged[3:].abs().max()) == 0  # a fresh ring's padding is zeros


def test_padding_past_the_ring_is_refused():
    ring = StagingRing(slots=2, max_batch_size=4, sample_shape=SHAPE, device=CPU)
    with pytest.raises(ValueError, match="batch of 5"):
        ring.stage(samples(2), rows=5)


def test_tensors_on_the_device_and_host_arrays_are_gathered_in_order():
    # given a batch whose samples 0 and 2 are tensors on the device already (DALI's
    # rows) and 1 and 3 host arrays (Pillow's), staged padded to six rows
    ring = StagingRing(slots=2, max_batch_size=8, sample_shape=SHAPE, device=CPU)
    ring.stage(samples(8, start=50))  # earlier pixels in both slots
    ring.stage(samples(8, start=60))
    mixed = [torch.full(SHAPE, 1, dtype=torch.uint8), *samples(1, start=2),
             torch.full(SHAPE, 3, dtype=torch.uint8), *samples(1, start=4)]

    # when they are staged
    staged = ring.stage(mixed, rows=6)

    # then each row holds its own sample, in order, and the padding is zeros
    assert staged.shape == (6, *SHAPE) and staged.dtype == torch.uint8
    assert [int(staged[i].min()) for i in range(4)] == [1, 2, 3, 4]
    assert [int(staged[i].max()) for i in range(4)] == [1, 2, 3, 4]
    assert int(staged[4:].abs().max()) == 0


def test_a_tensor_on_another_device_is_refused():
    ring = StagingRing(slots=2, max_batch_size=4, sample_shape=SHAPE, device=CPU)
    elsewhere = torch.zeros(SHAPE, dtype=torch.uint8, device="meta")
    with pytest.raises(ValueError, match="meta"):
        ring.stage([elsewhere])
