"""DMA-able memory for the userspace driver: 2 MiB hugetlbfs pages and their physical addresses.

A hugetlbfs page is physically contiguous and never migrated or swapped, so one
guest-physical base address describes all of it; ``/proc/self/pagemap`` gives it (PFNs
are only shown to CAP_SYS_ADMIN).  The rings and every command and response buffer live
in these pages; :class:`DmaArena` hands out pieces first-fit.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Final

import numpy as np
import numpy.typing as npt

from guest_tests.userspace.pci import buffer_address

__all__ = [
    "HUGE_PAGE_SIZE",
    "PAGE_SIZE",
    "DmaArena",
    "DmaBuffer",
    "DmaPage",
    "physical_addresses",
]

PAGE_SIZE: Final = 4096
HUGE_PAGE_SIZE: Final = 2 << 20
HUGETLBFS: Final = Path("/dev/hugepages")
PAGEMAP_PRESENT: Final = 1 << 63
PAGEMAP_PFN_MASK: Final = (1 << 55) - 1
_ALIGN: Final = 64


def physical_addresses(address: int, pages: int) -> npt.NDArray[np.uint64]:
    """Physical address of each 4 KiB page from ``address`` on (read from pagemap).

    :raise OSError: a page is not present, or PFNs are hidden (not root).
    """
    if address % PAGE_SIZE:
        raise ValueError(f"address {address:#x} is not page aligned")
    fd = os.open("/proc/self/pagemap", os.O_RDONLY)
    try:
        raw = os.pread(fd, 8 * pages, 8 * (address // PAGE_SIZE))
    finally:
        os.close(fd)
    entries = np.frombuffer(raw, dtype="<u8")
    if entries.shape[0] != pages:
        raise OSError(f"pagemap returned {entries.shape[0]} of {pages} entries")
    present = (entries & np.uint64(PAGEMAP_PRESENT)) != 0
    if not present.all():
        raise OSError(f"page {int(np.argmin(present))} at {address:#x} is not present")
    pfns = entries & np.uint64(PAGEMAP_PFN_MASK)
    if not pfns.any():
        raise PermissionError("pagemap hides PFNs: the driver must run as root")
    return pfns * np.uint64(PAGE_SIZE)


class DmaPage:
    """One 2 MiB hugetlbfs page, mapped, zeroed, with its physical base address."""

    def __init__(self) -> None:
        path = HUGETLBFS / f"vgpu-userspace-{os.getpid()}-{id(self):x}"
        fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_EXCL, 0o600)
        try:
            os.unlink(path)  # the mapping keeps the page; nothing is left behind
            os.ftruncate(fd, HUGE_PAGE_SIZE)
            self.map = mmap.mmap(fd, HUGE_PAGE_SIZE, mmap.MAP_SHARED,
                                 mmap.PROT_READ | mmap.PROT_WRITE)
        finally:
            os.close(fd)
        self.array = np.frombuffer(self.map, dtype=np.uint8)
        self.array[:] = 0  # faults the page in
        self.address = buffer_address(self.map)
        phys = physical_addresses(self.address, HUGE_PAGE_SIZE // PAGE_SIZE)
        if not np.array_equal(phys, phys[0] + np.arange(phys.shape[0], dtype=np.uint64)
                              * np.uint64(PAGE_SIZE)):
            raise OSError("the hugetlbfs page is not physically contiguous")
        self.phys = int(phys[0])
        self.size = HUGE_PAGE_SIZE

    def close(self) -> None:
        """Unmap (only once the device can no longer touch it: after a reset)."""
        del self.array
        with contextlib.suppress(BufferError):  # a view is alive: unmapped with the last one
            self.map.close()


@dataclass(eq=False)
class DmaBuffer:
    """A piece of a :class:`DmaPage`: bytes the device reads or writes."""

    page: DmaPage
    offset: int
    size: int

    @property
    def phys(self) -> int:
        """Guest-physical address."""
        return self.page.phys + self.offset

    @property
    def address(self) -> int:
        """Virtual address in this process."""
        return self.page.address + self.offset

    @property
    def array(self) -> npt.NDArray[np.uint8]:
        """A byte view of the buffer."""
        return self.page.array[self.offset:self.offset + self.size]

    def write(self, data: bytes, offset: int = 0) -> None:
        """Copy ``data`` into the buffer at ``offset``."""
        if offset + len(data) > self.size:
            raise ValueError(f"{len(data)} bytes at {offset} overflow a {self.size}-byte buffer")
        self.array[offset:offset + len(data)] = np.frombuffer(data, dtype=np.uint8)

    def read(self, size: int | None = None, offset: int = 0) -> bytes:
        """A copy of ``size`` bytes (default: all) from ``offset``."""
        end = self.size if size is None else offset + size
        return self.array[offset:end].tobytes()


class DmaArena:
    """First-fit allocator over hugetlbfs pages (an allocation never spans two pages)."""

    def __init__(self, pages: int = 2) -> None:
        self.pages: list[DmaPage] = []
        self._free: list[list[tuple[int, int]]] = []
        try:
            for _ in range(pages):
                self.pages.append(DmaPage())
                self._free.append([(0, HUGE_PAGE_SIZE)])
        except BaseException:
            self.close()
            raise

    def allocate(self, size: int, align: int = _ALIGN) -> DmaBuffer:
        """A zeroed buffer of ``size`` bytes aligned to ``align`` (a power of two >= 64).

        :raise MemoryError: no page has room.
        """
        need = max(_ALIGN, -(-size // _ALIGN) * _ALIGN)
        for page, free in zip(self.pages, self._free, strict=True):
            for i, (start, length) in enumerate(free):
                aligned = -(-start // align) * align
                if aligned + need > start + length:
                    continue
                end = start + length
                pieces = [(start, aligned - start), (aligned + need, end - aligned - need)]
                free[i:i + 1] = [p for p in pieces if p[1]]
                buffer = DmaBuffer(page, aligned, size)
                page.array[aligned:aligned + need] = 0
                return buffer
        raise MemoryError(f"no room for {size} DMA bytes in {len(self.pages)} hugepage(s)")

    def free(self, buffer: DmaBuffer) -> None:
        """Return a buffer (merging it with free neighbours)."""
        need = max(_ALIGN, -(-buffer.size // _ALIGN) * _ALIGN)
        free = self._free[self.pages.index(buffer.page)]
        free.append((buffer.offset, need))
        free.sort()
        merged: list[tuple[int, int]] = []
        for start, length in free:
            if merged and merged[-1][0] + merged[-1][1] == start:
                merged[-1] = (merged[-1][0], merged[-1][1] + length)
            else:
                merged.append((start, length))
        free[:] = merged

    def free_bytes(self) -> int:
        """Bytes not allocated (for leak checks)."""
        return sum(length for free in self._free for _, length in free)

    def close(self) -> None:
        """Unmap every page."""
        for page in self.pages:
            page.close()
        self.pages.clear()
        self._free.clear()

