"""A small first-fit allocator for GPU virtual addresses inside the GPUVM aperture."""

from __future__ import annotations

import bisect
import errno

from vgpu_backend.hostgpu.base import HostGpuError
from vgpu_backend.hostgpu.kfd_abi import PAGE_SIZE

__all__ = ["GpuVaAllocator"]

#: buffers of at least this size start on this boundary (huge GPU page table entries)
LARGE_ALIGN = 2 << 20


class GpuVaAllocator:
    """First-fit over ``[base, end)``; free ranges are kept sorted and coalesced.

    :param base: first usable GPU VA (page aligned).
    :param end: one past the last usable GPU VA.
    """

    def __init__(self, base: int, end: int) -> None:
        if base % PAGE_SIZE or end % PAGE_SIZE or end <= base:
            raise ValueError(f"bad GPU VA range [{base:#x}, {end:#x})")
        self.base = base
        self.end = end
        self._free_starts: list[int] = [base]
        self._free_end: dict[int, int] = {base: end}
        self._used: dict[int, int] = {}

    def allocate(self, size: int) -> int:
        """A free, page-aligned GPU VA range of ``size`` bytes (2 MiB aligned when the
        size is at least 2 MiB).

        :raise HostGpuError: no free range is large enough (ENOMEM).
        """
        size = -(-size // PAGE_SIZE) * PAGE_SIZE
        if size <= 0:
            raise ValueError(f"bad size {size}")
        align = LARGE_ALIGN if size >= LARGE_ALIGN else PAGE_SIZE
        for start in self._free_starts:
            stop = self._free_end[start]
            va = -(-start // align) * align
            if va + size <= stop:
                self._take(start, stop, va, va + size)
                self._used[va] = size
                return va
        raise HostGpuError(f"GPU VA space exhausted: no {size:#x}-byte range free in "
                           f"[{self.base:#x}, {self.end:#x})", errno.ENOMEM)

    def _take(self, start: int, stop: int, va: int, va_end: int) -> None:
        i = bisect.bisect_left(self._free_starts, start)
        del self._free_starts[i]
        del self._free_end[start]
        if va_end < stop:
            self._free_starts.insert(i, va_end)
            self._free_end[va_end] = stop
        if start < va:
            self._free_starts.insert(i, start)
            self._free_end[start] = va

    def free(self, va: int) -> None:
        """Return the range that :meth:`allocate` gave as ``va``."""
        size = self._used.pop(va)
        start, stop = va, va + size
        i = bisect.bisect_left(self._free_starts, start)
        if i < len(self._free_starts) and self._free_starts[i] == stop:
            stop = self._free_end.pop(stop)
            del self._free_starts[i]
        if i and self._free_end[self._free_starts[i - 1]] == start:
            self._free_end[self._free_starts[i - 1]] = stop
            return
        self._free_starts.insert(i, start)
        self._free_end[start] = stop

    def __len__(self) -> int:
        """Ranges currently allocated."""
        return len(self._used)

    def free_ranges(self) -> list[tuple[int, int]]:
        """The free ``(start, end)`` ranges, sorted (for tests and logs)."""
        return [(s, self._free_end[s]) for s in self._free_starts]
