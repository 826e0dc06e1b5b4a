"""The guest kernel's USERPTR entry building, as the userspace driver reproduces it
(pure functions, but like every guest test they run only inside a scripts/vm.py guest:
guest_tests/conftest.py skips them elsewhere)."""

from __future__ import annotations

import numpy as np

from guest_tests.userspace.pinned import MAX_SEGMENT, coalesce_pages, encode_entries
from protocol.virtio_gpu import MemEntry
from protocol.wire import decode

PAGE = 4096


def _pages(*runs: tuple[int, int]) -> np.ndarray:
    """Page addresses of runs (first page number, page count)."""
    return np.concatenate([(first + np.arange(count, dtype=np.uint64)) * np.uint64(PAGE)
                           for first, count in runs])


def test_physically_consecutive_pages_merge() -> None:
    addr, length = coalesce_pages(_pages((100, 7), (300, 2), (107, 1)))
    assert addr.tolist() == [100 * PAGE, 300 * PAGE, 107 * PAGE]
    assert length.tolist() == [7 * PAGE, 2 * PAGE, PAGE]


def test_descending_pages_do_not_merge() -> None:
    addr, length = coalesce_pages(np.array([5, 4, 3], dtype=np.uint64) * np.uint64(PAGE))
    assert addr.tolist() == [5 * PAGE, 4 * PAGE, 3 * PAGE]
    assert length.tolist() == [PAGE] * 3


def test_a_segment_closes_at_max_segment() -> None:
    pages_per_segment = MAX_SEGMENT // PAGE
    addr, length = coalesce_pages(_pages((0, 2 * pages_per_segment + 3)))
    assert length.tolist() == [MAX_SEGMENT, MAX_SEGMENT, 3 * PAGE]
    assert addr.tolist() == [0, MAX_SEGMENT, 2 * MAX_SEGMENT]


def test_no_pages_no_entries() -> None:
    addr, length = coalesce_pages(np.zeros(0, dtype=np.uint64))
    assert addr.shape == length.shape == (0,)


def test_entries_encode_as_virtio_gpu_mem_entry() -> None:
    data = encode_entries([0x1000, 0xFFFF_F000_0000], [0x2000, MAX_SEGMENT])
    assert len(data) == 32
    assert decode(MemEntry, data) == MemEntry(0x1000, 0x2000, 0)
    assert decode(MemEntry, data, 16) == MemEntry(0xFFFF_F000_0000, MAX_SEGMENT, 0)
