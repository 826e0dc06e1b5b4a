"""Guest RAM shared by the front-end: vhost-user memory regions mapped into this process.

Each region is ``mmap(fd, memory_size + mmap_offset)`` from file offset 0 (as
libvhost-user does: ``mmap_offset`` need not be page aligned); the guest byte at
``guest_phys_addr`` is at ``mmap_offset`` in the mapping.  The region's fd stays open:
the alias userptr path maps ranges of it again elsewhere.

Two address spaces are translated:

* guest-physical addresses (descriptor buffers, virtio-gpu mem entries) through
  ``guest_phys_addr``; a range must not leave guest RAM or wrap 2^64, and a range
  that crosses from one region into an adjacent one is split;
* QEMU virtual addresses (the ring addresses of SET_VRING_ADDR) through
  ``userspace_addr``.
"""

from __future__ import annotations

import gc
import itertools
import logging
import mmap
import os
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from protocol.errors import FrontendProtocolError, GuestProtocolError
from protocol.vhost_user import MemRegion
from protocol.virtio_gpu_codes import Resp
from vgpu_backend.hostgpu.hostmem import file_page_size

__all__ = ["GuestMemory", "MemoryRegion", "Segments"]

log = logging.getLogger(__name__)

U64 = npt.NDArray[np.uint64]
_MAX_U64 = (1 << 64) - 1
# guest-physical lookup table: at most this many buckets (one int64 each)
_MAX_BUCKETS = 1 << 16
_ids = itertools.count(1)


class MemoryRegion:
    """One mapped region.  ``array`` is a uint8 view of exactly the region's bytes."""

    def __init__(self, desc: MemRegion, fd: int) -> None:
        if desc.memory_size == 0:
            raise FrontendProtocolError("memory region of size 0")
        if desc.guest_phys_addr + desc.memory_size > _MAX_U64 or \
                desc.userspace_addr + desc.memory_size > _MAX_U64:
            raise FrontendProtocolError("memory region reaches or wraps 2^64")
        self.id = next(_ids)
        self.gpa = desc.guest_phys_addr
        self.size = desc.memory_size
        self.uaddr = desc.userspace_addr
        self.mmap_offset = desc.mmap_offset
        self.fd = fd
        try:
            self._mmap: mmap.mmap | None = mmap.mmap(
                fd, desc.memory_size + desc.mmap_offset, flags=mmap.MAP_SHARED,
                prot=mmap.PROT_READ | mmap.PROT_WRITE)
        except (OSError, ValueError, OverflowError) as err:
            raise FrontendProtocolError(f"cannot map memory region {desc}: {err}") from err
        whole = np.frombuffer(self._mmap, dtype=np.uint8)
        self.array: npt.NDArray[np.uint8] = whole[desc.mmap_offset:]
        #: the same bytes as a memoryview (cheaper than numpy for small scalar access)
        self.view = memoryview(self._mmap)[desc.mmap_offset:]
        #: host virtual address of the guest byte at ``gpa``
        self.host_addr = int(self.array.ctypes.data)
        try:  # the granule the host maps it in: > 4 KiB on hugetlb memory
            self.page_size = file_page_size(fd)
        except OSError:
            self.page_size = mmap.PAGESIZE

    @property
    def mapping(self) -> mmap.mmap:
        """The mapping itself: guest byte ``gpa + i`` is at ``mmap_offset + i``.  Slicing
        it copies the bytes with no view in between (the cheapest read)."""
        if self._mmap is None:
            raise ValueError(f"{self!r} is unmapped")
        return self._mmap

    @property
    def gpa_end(self) -> int:
        """One past the last guest-physical address."""
        return self.gpa + self.size

    def matches(self, desc: MemRegion) -> bool:
        """REM_MEM_REG matching: guest address, user address and size (not mmap_offset)."""
        return (self.gpa, self.uaddr, self.size) == (
            desc.guest_phys_addr, desc.userspace_addr, desc.memory_size)

    def same_as(self, desc: MemRegion, fd: int) -> bool:
        """Mapped exactly as ``desc`` says, from the same file as ``fd``."""
        if (self.gpa, self.size, self.uaddr, self.mmap_offset) != tuple(desc) or self.fd < 0:
            return False
        mine, theirs = os.fstat(self.fd), os.fstat(fd)
        return (mine.st_dev, mine.st_ino) == (theirs.st_dev, theirs.st_ino)

    def unmap(self) -> None:
        """Drop the mapping and close the fd.  Live numpy views keep the pages mapped
        until they die (never a dangling pointer)."""
        mapping, self._mmap = self._mmap, None
        del self.array
        self.view.release()
        if mapping is not None:
            try:
                mapping.close()
            except BufferError:  # views may only be held by garbage cycles: collect them
                gc.collect()
                try:
                    mapping.close()
                except BufferError:
                    log.debug("region %#x: views still alive, unmapped when they die",
                              self.gpa)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1

    def __repr__(self) -> str:
        return (f"MemoryRegion(gpa={self.gpa:#x}, size={self.size:#x}, "
                f"uaddr={self.uaddr:#x}, mmap_offset={self.mmap_offset:#x})")


@dataclass(frozen=True, slots=True)
class Segments:
    """Guest ranges translated to host: one row per piece, in order.

    ``region_id`` names the :class:`MemoryRegion`; ``offset`` is region-relative.
    """

    region_id: npt.NDArray[np.int64]
    offset: U64
    length: U64

    def __len__(self) -> int:
        return int(self.length.shape[0])

    @property
    def total(self) -> int:
        """Sum of the lengths."""
        return int(self.length.sum(dtype=np.uint64))

    def coalesced(self) -> Segments:
        """Merge neighbours that are contiguous in the same region."""
        n = len(self)
        if n < 2:
            return self
        end = self.offset + self.length
        contiguous = (end[:-1] == self.offset[1:]) & (self.region_id[1:] == self.region_id[:-1])
        if not contiguous.any():
            return self
        # boolean masks select faster than index arrays, and a merged run's length
        # is its last end minus its first offset (no reduceat over every piece)
        first = np.empty(n, dtype=np.bool_)
        first[0] = True
        np.logical_not(contiguous, out=first[1:])
        last = np.empty(n, dtype=np.bool_)
        last[:-1] = first[1:]
        last[-1] = True
        offset = self.offset[first]
        length = end[last]
        length -= offset
        return Segments(self.region_id[first], offset, length)


UnmapListener = Callable[[MemoryRegion], None]


class GuestMemory:
    """The current set of regions and the address translations over them."""

    def __init__(self) -> None:
        self._regions: list[MemoryRegion] = []
        self._by_id: dict[int, MemoryRegion] = {}
        self._listeners: list[UnmapListener] = []
        self._index()

    # --- region management ---------------------------------------------------------

    def add_unmap_listener(self, listener: UnmapListener) -> None:
        """``listener(region)`` runs before a region is unmapped: drop every view and
        host-GPU mapping that uses it."""
        self._listeners.append(listener)

    @property
    def regions(self) -> tuple[MemoryRegion, ...]:
        """Regions sorted by guest-physical address."""
        return tuple(self._regions)

    @property
    def huge_pages(self) -> bool:
        """Some guest RAM is on host huge pages (hugetlb)."""
        return any(r.page_size > mmap.PAGESIZE for r in self._regions)

    def region(self, region_id: int) -> MemoryRegion:
        """The region with this id (``KeyError`` once it is gone)."""
        return self._by_id[region_id]

    def add(self, desc: MemRegion, fd: int, max_regions: int) -> MemoryRegion:
        """Map a region (ADD_MEM_REG); takes ownership of ``fd``."""
        try:
            if len(self._regions) >= max_regions:
                raise FrontendProtocolError(f"more than {max_regions} memory regions")
            for other in self._regions:
                if desc.guest_phys_addr < other.gpa_end and \
                        other.gpa < desc.guest_phys_addr + desc.memory_size:
                    raise FrontendProtocolError(f"region {desc} overlaps {other}")
            region = MemoryRegion(desc, fd)
        except FrontendProtocolError:
            os.close(fd)
            raise
        self._regions.append(region)
        self._by_id[region.id] = region
        self._index()
        log.info("mapped guest memory %s", region)
        return region

    def replace_all(self, descs: list[MemRegion], fds: list[int], max_regions: int) -> None:
        """SET_MEM_TABLE: make the regions exactly ``descs``.  A region that is already
        mapped identically (same addresses, offset and backing file) is kept, so an
        unchanged table (QEMU re-sends it at every start) invalidates nothing.  Takes
        ownership of ``fds``."""
        wanted = list(zip(descs, fds, strict=True))
        keep: set[int] = set()
        for region in self._regions:
            for i, (desc, fd) in enumerate(wanted):
                if region.same_as(desc, fd):
                    keep.add(region.id)
                    os.close(fd)
                    del wanted[i]
                    break
        for region in [r for r in self._regions if r.id not in keep]:
            self._drop(region)
        for i, (desc, fd) in enumerate(wanted):
            try:
                self.add(desc, fd, max_regions)
            except FrontendProtocolError:
                for _, rest in wanted[i + 1:]:
                    os.close(rest)
                raise

    def remove(self, desc: MemRegion) -> bool:
        """Unmap the region matching ``desc`` (REM_MEM_REG); False if none matches."""
        for region in self._regions:
            if region.matches(desc):
                self._drop(region)
                return True
        return False

    def clear(self) -> None:
        """Unmap every region (SET_MEM_TABLE replacement, reset, disconnect)."""
        for region in list(self._regions):
            self._drop(region)

    def _drop(self, region: MemoryRegion) -> None:
        for listener in self._listeners:
            listener(region)
        self._regions.remove(region)
        del self._by_id[region.id]
        self._index()
        region.unmap()
        log.info("unmapped guest memory %s", region)

    def _index(self) -> None:
        self._regions.sort(key=lambda r: r.gpa)
        self._starts = np.array([r.gpa for r in self._regions], dtype=np.uint64)
        self._ends = np.array([r.gpa_end for r in self._regions], dtype=np.uint64)
        self._ids = np.array([r.id for r in self._regions], dtype=np.int64)
        # region id -> host base / fd / file offset, by direct indexing (ids are small)
        size = int(self._ids.max()) + 1 if self._regions else 1
        self._host_lut = np.zeros(size, dtype=np.uint64)
        self._fd_lut = np.full(size, -1, dtype=np.int32)
        self._file_lut = np.zeros(size, dtype=np.uint64)
        for r in self._regions:
            self._host_lut[r.id], self._fd_lut[r.id], self._file_lut[r.id] = \
                r.host_addr, r.fd, r.mmap_offset
        # adjacent[k]: region k+1 starts exactly where region k ends
        adjacent = self._ends[:-1] == self._starts[1:]
        self._gaps_before = np.concatenate(([0], np.cumsum(~adjacent))).astype(np.int64)
        self._index_buckets()

    def _index_buckets(self) -> None:
        """Bucket table: ``gpa >> shift`` -> sorted region index (-1: not RAM), with
        ``shift`` as large as every region boundary allows.  Front-ends align regions
        coarsely (one 512 MiB region; RAM split at 2 or 3 GiB), so the table is tiny
        and one ``take`` locates every entry; the last bucket is -1 and catches every
        address beyond RAM (``mode="clip"``)."""
        self._bucket_lut: npt.NDArray[np.int64] | None = None
        bounds = [b for r in self._regions for b in (r.gpa, r.gpa_end) if b]
        if not bounds:
            return
        shift = min((b & -b).bit_length() - 1 for b in bounds)
        buckets = max(bounds) >> shift
        if shift < 1 or buckets > _MAX_BUCKETS:  # shift >= 1: buckets fit in int64
            return
        lut = np.full(buckets + 1, -1, dtype=np.int64)
        for k, r in enumerate(self._regions):
            lut[r.gpa >> shift:r.gpa_end >> shift] = k
        self._bucket_lut, self._bucket_shift = lut, np.uint64(shift)

    # --- translation ---------------------------------------------------------------

    def qva_to_region(self, qva: int, length: int) -> tuple[MemoryRegion, int]:
        """Region and offset of ``[qva, qva+length)`` in QEMU's address space."""
        for region in self._regions:
            if region.uaddr <= qva and qva + length <= region.uaddr + region.size:
                return region, qva - region.uaddr
        raise GuestProtocolError(f"QEMU address {qva:#x}+{length:#x} is not guest RAM",
                                 Resp.ERR_UNSPEC, ring_fatal=True)

    def gpa_to_region(self, gpa: int, length: int) -> tuple[MemoryRegion, int]:
        """Region and offset of ``[gpa, gpa+length)``, which must lie in one region."""
        for region in self._regions:
            if region.gpa <= gpa and gpa + length <= region.gpa_end:
                return region, gpa - region.gpa
        raise GuestProtocolError(f"guest address {gpa:#x}+{length:#x} is not in one region")

    def translate(self, addr: U64, length: U64, *, lengths_checked: bool = False) -> Segments:
        """Translate guest-physical ``(addr, length)`` ranges, in order, splitting those
        that cross into an adjacent region.  Vectorised; lengths must be non-zero
        (``lengths_checked``: the caller has verified that already).

        :raise GuestProtocolError: a range wraps 2^64 or is not entirely guest RAM.
        """
        addr = np.asarray(addr, dtype=np.uint64)
        length = np.asarray(length, dtype=np.uint64)
        n = addr.shape[0]
        if n == 0:
            empty = np.zeros(0, dtype=np.uint64)
            return Segments(np.zeros(0, dtype=np.int64), empty, empty.copy())
        if not lengths_checked and np.any(length == 0):
            raise GuestProtocolError(f"entry {int(np.argmin(length))} has length 0")
        end = addr + length  # wraps silently in uint64
        # two reductions rule out wrapping without a pass that allocates
        if int(addr.max()) + int(length.max()) > _MAX_U64 and np.any(end < addr):
            bad = int(np.argmax(end < addr))
            raise GuestProtocolError(
                f"entry {bad}: {int(addr[bad]):#x}+{int(length[bad]):#x} wraps 2^64")
        if not self._regions:
            raise GuestProtocolError("no guest memory is mapped")
        if len(self._regions) == 1:
            region = self._regions[0]
            ok = (addr >= np.uint64(region.gpa)) & (end <= np.uint64(region.gpa_end))
            if not ok.all():
                self._raise_first_bad(addr, length, ok)
            return Segments(np.full(n, region.id, dtype=np.int64),
                            addr - np.uint64(region.gpa), length)
        if self._bucket_lut is not None:
            first = np.take(self._bucket_lut, (addr >> self._bucket_shift).view(np.int64),
                            mode="clip")
            last_byte = end - np.uint64(1)
            last_byte >>= self._bucket_shift
            last = np.take(self._bucket_lut, last_byte.view(np.int64), mode="clip")
            # first and last byte in the same region's buckets: the range is inside it
            if int(first.min()) >= 0 and np.array_equal(first, last):
                offset = addr - np.take(self._starts, first)
                return Segments(np.take(self._ids, first), offset, length)
            return self._translate_crossing(addr, end, self._locate(addr))
        first = self._locate(addr)
        fits = (first >= 0) & (end <= self._ends[first])
        if fits.all():
            return Segments(self._ids[first], addr - self._starts[first], length)
        return self._translate_crossing(addr, end, first)

    def _translate_crossing(self, addr: U64, end: U64, first: npt.NDArray[np.int64]) -> Segments:
        """Slow path of :meth:`translate`: some ranges span several (adjacent) regions."""
        n = addr.shape[0]
        last = self._locate(end - np.uint64(1))
        valid = first >= 0
        first_c, last_c = np.maximum(first, 0), np.maximum(last, 0)
        ok = valid & (addr < self._ends[first_c]) & (end <= self._ends[last_c]) & (
            self._gaps_before[last_c] == self._gaps_before[first_c])
        if not ok.all():
            self._raise_first_bad(addr, end - addr, ok)
        spans = last - first + 1
        entry = np.repeat(np.arange(n), spans)
        step = np.arange(entry.shape[0]) - np.repeat(np.cumsum(spans) - spans, spans)
        region_index = first[entry] + step
        seg_start = np.maximum(addr[entry], self._starts[region_index])
        seg_end = np.minimum(end[entry], self._ends[region_index])
        return Segments(self._ids[region_index], seg_start - self._starts[region_index],
                        seg_end - seg_start)

    def _locate(self, values: U64) -> npt.NDArray[np.int64]:
        """Index of the last region starting at or below each value (-1: none).

        A comparison per region beats ``searchsorted`` ~8x while there are few regions.
        """
        if len(self._starts) > 16:
            return np.searchsorted(self._starts, values, side="right").astype(np.int64) - 1
        index = np.full(values.shape, -1, dtype=np.int64)
        for start in self._starts:
            index += values >= start
        return index

    @staticmethod
    def _raise_first_bad(addr: U64, length: U64, ok: npt.NDArray[np.bool_]) -> None:
        bad = int(np.argmin(ok))
        raise GuestProtocolError(
            f"entry {bad}: {int(addr[bad]):#x}+{int(length[bad]):#x} is not guest RAM")

    def host_base(self, region_ids: npt.NDArray[np.int64]) -> U64:
        """Host address of each (live) region's first guest byte."""
        return np.take(self._host_lut, region_ids)  # take: faster than fancy indexing

    def file_base(self, region_ids: npt.NDArray[np.int64]) -> tuple[
            npt.NDArray[np.int32], U64]:
        """Backing fd and file offset of each (live) region's first guest byte."""
        return np.take(self._fd_lut, region_ids), np.take(self._file_lut, region_ids)
