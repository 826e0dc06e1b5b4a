"""A program's buffer in guest RAM as the USERPTR guest driver sees it: whole pinned
pages, sent as coalesced ``{addr, length}`` entries in buffer order."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from protocol.virtio_gpu import MemEntry
from protocol.wire import encode
from tests.frontend.gpu_driver import coalesce
from tests.frontend.guest_ram import PAGE_SIZE, GuestRam, Segment

__all__ = ["GuestBuffer", "contiguous_buffer", "crossing_buffer", "entry_bytes",
           "page_aligned", "scattered_buffer"]


def entry_bytes(entries: Sequence[Segment]) -> bytes:
    """The ``virtio_gpu_mem_entry`` array."""
    return b"".join(encode(MemEntry(e.gpa, e.length)) for e in entries)


def page_aligned(nbytes: int) -> int:
    """``nbytes`` rounded up to whole pages."""
    return -(-nbytes // PAGE_SIZE) * PAGE_SIZE


@dataclass(slots=True)
class GuestBuffer:
    """Guest pages of one buffer; ``entries`` in buffer order (what goes on the wire)."""

    entries: list[Segment]

    @property
    def size(self) -> int:
        """Bytes covered by the entries."""
        return sum(e.length for e in self.entries)

    def _pieces(self, offset: int, length: int) -> list[tuple[int, int, int]]:
        """``(gpa, bytes, position in the request)`` of ``[offset, offset+length)``."""
        if offset < 0 or offset + length > self.size:
            raise ValueError(f"bytes {offset}..{offset + length} outside a {self.size}-byte "
                             "buffer")
        out, pos = [], 0
        for e in self.entries:
            if offset >= e.length:
                offset -= e.length
                continue
            n = min(e.length - offset, length - pos)
            if n <= 0:
                break
            out.append((e.gpa + offset, n, pos))
            pos += n
            offset = 0
        return out

    def write(self, ram: GuestRam, data: bytes | npt.NDArray[np.generic], offset: int = 0
              ) -> None:
        """Store ``data`` at byte ``offset`` of the buffer."""
        raw = data if isinstance(data, bytes) else np.ascontiguousarray(data).tobytes()
        for gpa, n, pos in self._pieces(offset, len(raw)):
            ram.write(gpa, raw[pos:pos + n])

    def read(self, ram: GuestRam, length: int | None = None, offset: int = 0) -> bytes:
        """``length`` bytes (default: to the end) from byte ``offset``."""
        length = self.size - offset if length is None else length
        return b"".join(ram.read(gpa, n) for gpa, n, _ in self._pieces(offset, length))

    def array(self, ram: GuestRam, dtype: npt.DTypeLike, count: int | None = None,
              offset: int = 0) -> npt.NDArray[np.generic]:
        """The bytes as a numpy array of ``dtype``."""
        dt = np.dtype(dtype)
        length = None if count is None else count * dt.itemsize
        return np.frombuffer(self.read(ram, length, offset), dtype=dt)

    def free(self, ram: GuestRam) -> None:
        """Give the pages back to the allocator (page by page: an entry may cross into
        the next region)."""
        for e in self.entries:
            for page in range(e.gpa, e.gpa + e.length, PAGE_SIZE):
                ram.free(page, PAGE_SIZE)


def scattered_buffer(ram: GuestRam, nbytes: int, *, regions: Sequence[int] | None = None
                     ) -> GuestBuffer:
    """Pages no two of which are adjacent, in random order: one entry per page."""
    pages = page_aligned(nbytes) // PAGE_SIZE
    gpas = ram.alloc_scattered(pages, regions=regions)
    return GuestBuffer([Segment(g, PAGE_SIZE) for g in gpas])


def contiguous_buffer(ram: GuestRam, nbytes: int, *, region: int | None = None) -> GuestBuffer:
    """One run of pages: one entry."""
    length = page_aligned(nbytes)
    return GuestBuffer([Segment(ram.alloc_contiguous(length, region=region), length)])


def crossing_buffer(ram: GuestRam, pages_before: int, pages_after: int) -> GuestBuffer:
    """One entry running from the end of region 0 into region 1 (the regions must be
    adjacent in guest-physical space)."""
    boundary = ram.regions[0].end
    if ram.regions[1].guest_phys_addr != boundary:
        raise ValueError("the regions are not adjacent")
    start = boundary - pages_before * PAGE_SIZE
    length = (pages_before + pages_after) * PAGE_SIZE
    ram.alloc_at(start, length)
    return GuestBuffer(coalesce([Segment(start, length)]))
