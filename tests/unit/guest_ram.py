"""Guest RAM for in-process tests: memfd regions seen from both sides.

The driver side writes and reads through its own mapping of each memfd; the device
side is a real :class:`GuestMemory` that maps a duplicate of the same fd, exactly as
the back-end maps what QEMU sends with ``ADD_MEM_REG``.
"""

from __future__ import annotations

import mmap
import os
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.vhost_user import MemRegion
from vgpu_backend.guest_memory import GuestMemory

__all__ = ["QEMU_VA_BASE", "GuestRam", "RamRegion"]

#: QEMU virtual address of the first region; the others follow, 1 GiB apart
QEMU_VA_BASE = 0x7F00_0000_0000
_QEMU_VA_STRIDE = 1 << 30


@dataclass(frozen=True, slots=True)
class RamRegion:
    """One region: ``size`` guest bytes at ``gpa``, at ``mmap_offset`` in its memfd."""

    gpa: int
    size: int
    mmap_offset: int
    uaddr: int
    mapping: mmap.mmap

    @property
    def end(self) -> int:
        """One past the last guest-physical address."""
        return self.gpa + self.size


class GuestRam:
    """Regions given as ``(gpa, size)`` or ``(gpa, size, mmap_offset)``."""

    def __init__(self, layout: Sequence[tuple[int, ...]], max_regions: int = 32) -> None:
        self.memory = GuestMemory()
        self.regions: list[RamRegion] = []
        try:
            for spec in layout:
                gpa, size = spec[0], spec[1]
                offset = spec[2] if len(spec) > 2 else 0
                self._add(gpa, size, offset, max_regions)
        except BaseException:
            self.close()
            raise

    def _add(self, gpa: int, size: int, offset: int, max_regions: int) -> None:
        fd = os.memfd_create("vgpu-test-ram", os.MFD_CLOEXEC)
        try:
            os.ftruncate(fd, size + offset)
            mapping = mmap.mmap(fd, size + offset)
            uaddr = QEMU_VA_BASE + len(self.regions) * _QEMU_VA_STRIDE
            self.memory.add(MemRegion(gpa, size, uaddr, offset), os.dup(fd), max_regions)
        finally:
            os.close(fd)
        self.regions.append(RamRegion(gpa, size, offset, uaddr, mapping))

    def qva(self, gpa: int) -> int:
        """QEMU's virtual address of a guest-physical address."""
        region, _ = self._locate(gpa, 1)
        return region.uaddr + gpa - region.gpa

    def _locate(self, gpa: int, length: int) -> tuple[RamRegion, int]:
        for region in self.regions:
            if region.gpa <= gpa and gpa + length <= region.end:
                return region, region.mmap_offset + gpa - region.gpa
        raise ValueError(f"test bug: {gpa:#x}+{length:#x} is not inside one region")

    def write(self, gpa: int, data: bytes) -> None:
        """Store ``data`` at ``gpa`` (inside one region)."""
        region, pos = self._locate(gpa, len(data))
        region.mapping[pos:pos + len(data)] = data

    def read(self, gpa: int, length: int) -> bytes:
        """``length`` bytes at ``gpa`` (may span adjacent regions)."""
        out = bytearray()
        while length:
            region = next(r for r in self.regions if r.gpa <= gpa < r.end)
            take = min(length, region.end - gpa)
            pos = region.mmap_offset + gpa - region.gpa
            out += region.mapping[pos:pos + take]
            gpa, length = gpa + take, length - take
        return bytes(out)

    def close(self) -> None:
        """Unmap the device side (closing its fds); the driver mappings die with us."""
        self.memory.clear()
        for region in self.regions:
            region.mapping.close()
        self.regions.clear()
