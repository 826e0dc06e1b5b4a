"""A program's own memory, pinned in place, described as USERPTR mem entries.

The patched guest kernel pins ``[addr & PAGE_MASK, roundup(addr + size))`` with
``pin_user_pages(FOLL_LONGTERM)`` and sends one ``virtio_gpu_mem_entry`` per segment of
``sg_alloc_table_from_pages_segment(max_segment = 0xFFFFF000)``: physically consecutive
pages merged, a segment closed when it reaches ``max_segment``.  Userspace cannot pin
like that; the closest it gets is touching and ``mlock``-ing the pages (resident, never
swapped) with ``vm.compact_unevictable_allowed = 0`` (compaction leaves locked pages
alone) and no THP collapse on 4 KiB buffers (``MADV_NOHUGEPAGE``).  :meth:`PinnedBuffer.moved`
re-reads pagemap so a test can prove its pages stayed where the device was told they are.
"""

from __future__ import annotations

import contextlib
import ctypes
import mmap
import os
from pathlib import Path
from typing import Any, Final

import numpy as np
import numpy.typing as npt

from guest_tests.userspace.dma import HUGE_PAGE_SIZE, PAGE_SIZE, physical_addresses
from guest_tests.userspace.pci import buffer_address
from protocol.virtio_gpu import MemEntry
from protocol.wire import layout

__all__ = ["MAX_SEGMENT", "PinnedBuffer", "coalesce_pages", "encode_entries"]

#: ``ALIGN_DOWN(UINT_MAX, PAGE_SIZE)``: drm_prime_pages_to_sg's segment limit
MAX_SEGMENT: Final = 0xFFFFF000
COMPACT_UNEVICTABLE: Final = Path("/proc/sys/vm/compact_unevictable_allowed")
_ENTRY_DTYPE: Final = layout(MemEntry).dtype
_libc = ctypes.CDLL(None, use_errno=True)
U64 = npt.NDArray[np.uint64]


def coalesce_pages(phys: U64, max_segment: int = MAX_SEGMENT) -> tuple[U64, U64]:
    """Merge page addresses into ``(addr, length)`` segments the way the guest kernel does."""
    phys = np.asarray(phys, dtype=np.uint64)
    count = phys.shape[0]
    if count == 0:
        return np.zeros(0, np.uint64), np.zeros(0, np.uint64)
    breaks = np.flatnonzero(phys[1:] != phys[:-1] + np.uint64(PAGE_SIZE)) + 1
    starts = np.concatenate([[0], breaks]).astype(np.int64)
    ends = np.concatenate([breaks, [count]]).astype(np.int64)
    max_pages = max_segment // PAGE_SIZE
    chunks = -(-(ends - starts) // max_pages)
    run = np.repeat(np.arange(starts.shape[0]), chunks)
    within = np.arange(run.shape[0]) - np.repeat(np.cumsum(chunks) - chunks, chunks)
    first = starts[run] + within * max_pages
    pages = np.minimum(max_pages, ends[run] - first)
    return phys[first], pages.astype(np.uint64) * np.uint64(PAGE_SIZE)


def encode_entries(addr: npt.ArrayLike, length: npt.ArrayLike) -> bytes:
    """``virtio_gpu_mem_entry[]`` bytes for these segments (the wire struct's dtype)."""
    entries = np.zeros(np.asarray(addr).shape[0], dtype=_ENTRY_DTYPE)
    entries["addr"] = np.asarray(addr, dtype=np.uint64)
    entries["length"] = np.asarray(length, dtype=np.uint64)
    return entries.tobytes()


def forbid_compacting_locked_pages() -> None:
    """``vm.compact_unevictable_allowed = 0``: compaction must not move mlocked pages."""
    if COMPACT_UNEVICTABLE.read_text().strip() != "0":
        COMPACT_UNEVICTABLE.write_text("0\n")


def _check(result: int, what: str) -> None:
    if result != 0:
        error = ctypes.get_errno()
        raise OSError(error, f"{what}: {os.strerror(error)}")


class PinnedBuffer:
    """``size`` bytes of ordinary anonymous memory starting ``offset`` bytes into a page.

    :param huge: back it with transparent huge pages (2 MiB aligned, ``MADV_HUGEPAGE``),
        which makes 512-page physically contiguous runs likely.
    """

    def __init__(self, size: int, *, offset: int = 0, huge: bool = False) -> None:
        if size <= 0 or not 0 <= offset < PAGE_SIZE:
            raise ValueError(f"size {size} / in-page offset {offset}")
        forbid_compacting_locked_pages()
        self.size, self.offset, self.huge = size, offset, huge
        self.span = -(-(offset + size) // PAGE_SIZE) * PAGE_SIZE
        slack = HUGE_PAGE_SIZE if huge else 0
        self._map = mmap.mmap(-1, self.span + slack, mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
        base = buffer_address(self._map)
        start = -(-base // HUGE_PAGE_SIZE) * HUGE_PAGE_SIZE - base if huge else 0
        self._map.madvise(mmap.MADV_HUGEPAGE if huge else mmap.MADV_NOHUGEPAGE)
        self.page_address = base + start
        self._pages = np.frombuffer(self._map, dtype=np.uint8)[start:start + self.span]
        self._pages[:] = 0  # write faults: real pages, not the shared zero page
        _check(_libc.mlock(ctypes.c_void_p(self.page_address), ctypes.c_size_t(self.span)),
               "mlock")
        self.locked, self.closed = True, False
        self.phys = physical_addresses(self.page_address, self.span // PAGE_SIZE)

    @property
    def address(self) -> int:
        """The program's pointer: where its data starts (``userptr`` in the ioctl)."""
        return self.page_address + self.offset

    @property
    def data(self) -> npt.NDArray[np.uint8]:
        """The ``size`` bytes of the buffer (a view: writes go straight to the pages)."""
        return self._pages[self.offset:self.offset + self.size]

    def view(self, dtype: npt.DTypeLike, count: int | None = None,
             byte_offset: int = 0) -> npt.NDArray[Any]:
        """The buffer (from ``byte_offset``) as ``count`` items of ``dtype``."""
        item = np.dtype(dtype).itemsize
        count = (self.size - byte_offset) // item if count is None else count
        if byte_offset < 0 or byte_offset + count * item > self.size:
            raise ValueError(f"{count} x {item} bytes at {byte_offset} overflow {self.size}")
        raw = self.data[byte_offset:byte_offset + count * item]
        return raw.view(dtype)

    def entries(self) -> tuple[U64, U64]:
        """The coalesced ``(addr, length)`` segments of the pinned pages."""
        return coalesce_pages(self.phys)

    def entry_bytes(self) -> bytes:
        """The segments as ``virtio_gpu_mem_entry[]`` bytes."""
        return encode_entries(*self.entries())

    @staticmethod
    def thp_enabled() -> bool:
        """Transparent huge pages may back ``huge`` buffers (not ``[never]``)."""
        mode = Path("/sys/kernel/mm/transparent_hugepage/enabled")
        return mode.exists() and "[never]" not in mode.read_text()

    def moved(self) -> int:
        """How many pages now sit at another physical address than when pinned."""
        return int(np.count_nonzero(
            physical_addresses(self.page_address, self.span // PAGE_SIZE) != self.phys))

    def close(self) -> None:
        """Unlock and unmap (only after the device dropped the blob: UNREF or reset)."""
        if self.closed:
            return
        self.closed = True
        if self.locked:
            _libc.munlock(ctypes.c_void_p(self.page_address), ctypes.c_size_t(self.span))
            self.locked = False
        del self._pages
        with contextlib.suppress(BufferError):  # views are alive: unmapped with the last
            self._map.close()

    def __enter__(self) -> PinnedBuffer:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
