"""Simulated guest RAM: one memfd, mapped once, cut into vhost-user memory regions.

Like QEMU's ``memory-backend-memfd,share=on``: the whole guest RAM is one memfd; each
vhost-user region is a guest-physical range backed by the memfd at some file offset
(``mmap_offset``) and seen by QEMU at some virtual address (``userspace_addr``).  A
split layout mirrors QEMU's below-4G/above-4G regions (same fd, different offsets).

A page allocator hands out guest-physical pages, contiguous or deliberately scattered
(no two consecutive pages adjacent, so a device cannot coalesce them).
"""

from __future__ import annotations

import contextlib
import mmap
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from protocol.vhost_user import MemRegion

__all__ = ["PAGE_SIZE", "GuestRam", "RamRegion", "Segment"]

PAGE_SIZE = 4096
HUGE_PAGE_SIZE = 2 << 20
#: QEMU-virtual base address of guest RAM (what QEMU's own mmap returned; any value works)
QEMU_VA_BASE = 0x7F5A_0000_0000
#: where QEMU puts RAM above the 32-bit PCI hole
ABOVE_4G = 0x1_0000_0000


@dataclass(frozen=True, slots=True)
class Segment:
    """A guest-physical byte range (one descriptor buffer or one backing entry)."""

    gpa: int
    length: int


@dataclass(frozen=True, slots=True)
class RamRegion:
    """One vhost-user memory region of the memfd."""

    guest_phys_addr: int
    memory_size: int
    mmap_offset: int
    userspace_addr: int

    @property
    def end(self) -> int:
        """One past the last guest-physical address."""
        return self.guest_phys_addr + self.memory_size

    def contains(self, gpa: int, length: int = 1) -> bool:
        """Whether ``[gpa, gpa+length)`` lies inside this region."""
        return self.guest_phys_addr <= gpa and gpa + length <= self.end

    def to_wire(self) -> MemRegion:
        """The ``VhostUserMemoryRegion`` QEMU would send."""
        return MemRegion(self.guest_phys_addr, self.memory_size, self.userspace_addr,
                         self.mmap_offset)


class GuestRam:
    """memfd-backed guest RAM with vhost-user regions and a page allocator.

    :param size: total bytes (multiple of the page size).
    :param split_at: if given, two regions: ``[0, split_at)`` at file offset 0 and the
        rest at guest-physical ``high_gpa`` (default 4 GiB, like QEMU) at file offset
        ``split_at``.  ``high_gpa=split_at`` makes the regions adjacent in guest-physical
        space, so one buffer can cross from one region into the next.
    :param hugetlb: back the RAM with 2 MiB huge pages (QEMU's
        ``memory-backend-memfd,hugetlb=on``; needs ``vm.nr_hugepages`` reserved).
    """

    def __init__(self, size: int, *, split_at: int | None = None,
                 high_gpa: int | None = None, seed: int = 1, hugetlb: bool = False) -> None:
        if size % PAGE_SIZE or size <= 0:
            raise ValueError("guest RAM size must be a positive multiple of 4096")
        if hugetlb and size % HUGE_PAGE_SIZE:
            raise ValueError("hugetlb guest RAM must be a multiple of 2 MiB")
        self.size = size
        self.fd = os.memfd_create("vgpu-test-guest-ram", os.MFD_CLOEXEC | (
            os.MFD_HUGETLB | os.MFD_HUGE_2MB if hugetlb else 0))
        os.ftruncate(self.fd, size)
        self.map = mmap.mmap(self.fd, size, mmap.MAP_SHARED, mmap.PROT_READ | mmap.PROT_WRITE)
        self.bytes: npt.NDArray[np.uint8] = np.frombuffer(self.map, dtype=np.uint8)
        if split_at is None:
            self.regions = [RamRegion(0, size, 0, QEMU_VA_BASE)]
        else:
            if split_at % PAGE_SIZE or not 0 < split_at < size:
                raise ValueError("split_at must be a page-aligned offset inside the RAM")
            high = ABOVE_4G if high_gpa is None else high_gpa
            if high < split_at:
                raise ValueError("the high region must start above the low one")
            self.regions = [
                RamRegion(0, split_at, 0, QEMU_VA_BASE),
                RamRegion(high, size - split_at, split_at, QEMU_VA_BASE + split_at),
            ]
        self._free = [np.ones(r.memory_size // PAGE_SIZE, dtype=bool) for r in self.regions]
        self._rng = random.Random(seed)

    # --- translation -------------------------------------------------------------

    def region_of(self, gpa: int) -> int:
        """Index of the region holding ``gpa`` (``KeyError`` if none)."""
        for i, region in enumerate(self.regions):
            if region.contains(gpa):
                return i
        raise KeyError(f"guest-physical address {gpa:#x} is not RAM")

    def file_offset(self, gpa: int) -> int:
        """Offset in the memfd of guest-physical ``gpa``."""
        region = self.regions[self.region_of(gpa)]
        return region.mmap_offset + gpa - region.guest_phys_addr

    def qva(self, gpa: int) -> int:
        """QEMU-virtual address of ``gpa`` (what SET_VRING_ADDR carries)."""
        region = self.regions[self.region_of(gpa)]
        return region.userspace_addr + gpa - region.guest_phys_addr

    def _pieces(self, gpa: int, length: int) -> Iterable[tuple[int, int, int]]:
        """``(file offset, bytes, offset in the request)`` pieces, split at regions."""
        done = 0
        while done < length:
            region = self.regions[self.region_of(gpa + done)]
            here = min(length - done, region.end - (gpa + done))
            yield region.mmap_offset + gpa + done - region.guest_phys_addr, here, done
            done += here

    def write(self, gpa: int, data: bytes | bytearray | memoryview) -> None:
        """Write bytes at ``gpa`` (may cross adjacent regions)."""
        view = memoryview(data).cast("B")
        for offset, n, at in self._pieces(gpa, len(view)):
            self.map[offset:offset + n] = view[at:at + n]

    def read(self, gpa: int, length: int) -> bytes:
        """Read bytes at ``gpa`` (may cross adjacent regions)."""
        return b"".join(self.map[offset:offset + n] for offset, n, _ in
                        self._pieces(gpa, length))

    def view(self, gpa: int, length: int) -> npt.NDArray[np.uint8]:
        """A writable numpy view of ``[gpa, gpa+length)``, which must be in one region."""
        region = self.regions[self.region_of(gpa)]
        if not region.contains(gpa, length):
            raise ValueError("view crosses a region boundary")
        offset = region.mmap_offset + gpa - region.guest_phys_addr
        return self.bytes[offset:offset + length]

    # --- page allocator ------------------------------------------------------------

    def _take(self, region: int, first: int, count: int) -> int:
        self._free[region][first:first + count] = False
        return self.regions[region].guest_phys_addr + first * PAGE_SIZE

    def alloc_contiguous(self, length: int, *, region: int | None = None) -> int:
        """Guest-physical address of ``length`` bytes of contiguous zeroed pages."""
        pages = -(-length // PAGE_SIZE) or 1
        order = range(len(self.regions)) if region is None else [region]
        for r in order:
            free = self._free[r]
            if len(free) < pages:
                continue
            # a run of `pages` free pages starts at i when the window sum is `pages`
            csum = np.concatenate(([0], np.cumsum(free, dtype=np.int64)))
            starts = np.flatnonzero(csum[pages:] - csum[:-pages] == pages)
            if len(starts):
                gpa = self._take(r, int(starts[0]), pages)
                self.write(gpa, bytes(pages * PAGE_SIZE))
                return gpa
        raise MemoryError(f"no {pages} contiguous free pages")

    def alloc_scattered(self, npages: int, *, regions: Sequence[int] | None = None,
                        shuffle: bool = True) -> list[int]:
        """``npages`` zeroed pages, no two of them adjacent, optionally in random order.

        With several ``regions`` the pages alternate between them.
        """
        order = list(range(len(self.regions)) if regions is None else regions)
        candidates: list[list[int]] = []
        for r in order:
            free = self._free[r]
            # every other free page whose neighbours are both free or absent
            idx = np.flatnonzero(free)
            idx = idx[idx % 2 == 1] if len(idx) else idx
            candidates.append([int(i) for i in idx])
        chosen: list[tuple[int, int]] = []
        cursor = [0] * len(order)
        while len(chosen) < npages:
            progressed = False
            for k, r in enumerate(order):
                if len(chosen) == npages:
                    break
                if cursor[k] < len(candidates[k]):
                    chosen.append((r, candidates[k][cursor[k]]))
                    cursor[k] += 1
                    progressed = True
            if not progressed:
                raise MemoryError(f"cannot find {npages} scattered free pages")
        if shuffle:
            self._rng.shuffle(chosen)
        gpas = []
        for r, page in chosen:
            gpa = self._take(r, page, 1)
            self.write(gpa, bytes(PAGE_SIZE))
            gpas.append(gpa)
        return gpas

    def alloc_at(self, gpa: int, length: int) -> int:
        """Take the free pages covering ``[gpa, gpa+length)`` (may span adjacent regions)."""
        first, end = gpa - gpa % PAGE_SIZE, gpa + length
        pages = [(self.region_of(p), p) for p in range(first, end, PAGE_SIZE)]
        for r, p in pages:
            index = (p - self.regions[r].guest_phys_addr) // PAGE_SIZE
            if not self._free[r][index]:
                raise MemoryError(f"page {p:#x} is already in use")
        for r, p in pages:
            self._take(r, (p - self.regions[r].guest_phys_addr) // PAGE_SIZE, 1)
            self.write(p, bytes(PAGE_SIZE))
        return gpa

    def free(self, gpa: int, length: int) -> None:
        """Return pages to the allocator."""
        r = self.region_of(gpa)
        first = (gpa - self.regions[r].guest_phys_addr) // PAGE_SIZE
        pages = -(-length // PAGE_SIZE) or 1
        self._free[r][first:first + pages] = True

    def free_pages(self) -> int:
        """Number of free pages left."""
        return int(sum(int(f.sum()) for f in self._free))

    # --- outside RAM -----------------------------------------------------------------

    def unbacked_gpa(self) -> int:
        """A guest-physical address that no region covers (for hostile tests)."""
        top = max(r.end for r in self.regions)
        return top + 16 * PAGE_SIZE

    def close(self) -> None:
        """Unmap and close the memfd."""
        del self.bytes
        # a test may still hold a numpy view; the GC unmaps the memory later then
        with contextlib.suppress(BufferError):
            self.map.close()
        os.close(self.fd)
