"""Split-ring arithmetic: ``vring_need_event`` against a brute-force model, ring sizes."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.virtqueue import (
    AVAIL_RING_OFFSET,
    USED_RING_OFFSET,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
    vring_need_event,
)

U16 = st.integers(0, 0xFFFF)


def crosses_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """Brute force: did the index step through ``event_idx`` on its way from ``old_idx``
    to ``new_idx`` (i.e. is ``event_idx`` one of old, old+1, ..., new-1, mod 2^16)?"""
    steps = (new_idx - old_idx) & 0xFFFF
    return any((old_idx + k) & 0xFFFF == event_idx for k in range(steps))


@settings(max_examples=200, deadline=None)
@given(event=U16, new=U16, old=U16)
def test_need_event_matches_the_model(event: int, new: int, old: int) -> None:
    assert vring_need_event(event, new, old) == crosses_event(event, new, old)


@settings(max_examples=300, deadline=None)
@given(old=U16, steps=st.integers(0, 40), event_offset=st.integers(-5, 45))
def test_need_event_near_the_window(old: int, steps: int, event_offset: int) -> None:
    new, event = (old + steps) & 0xFFFF, (old + event_offset) & 0xFFFF
    assert vring_need_event(event, new, old) == (0 <= event_offset < steps)


@pytest.mark.parametrize("old", [0, 1, 0xFFFE, 0xFFFF])
def test_need_event_exhaustive_over_small_steps(old: int) -> None:
    for steps in range(0, 4):
        new = (old + steps) & 0xFFFF
        for event in range(0x10000):
            assert vring_need_event(event, new, old) == crosses_event(event, new, old)


def test_no_movement_never_notifies() -> None:
    assert not any(vring_need_event(e, 7, 7) for e in range(0x10000))


@pytest.mark.parametrize("num", [1, 2, 16, 64, 256, 32768])
def test_ring_sizes(num: int) -> None:
    assert desc_table_size(num) == 16 * num
    assert avail_ring_size(num) == 2 + 2 + 2 * num + 2
    assert used_ring_size(num) == 2 + 2 + 8 * num + 2
    assert AVAIL_RING_OFFSET == USED_RING_OFFSET == 4
