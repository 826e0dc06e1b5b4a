"""The driver side of one split virtqueue (virtio 1.x, 2.7) in DMA memory.

Layout in one :class:`~guest_tests.userspace.dma.DmaBuffer`: the descriptor table, the
available ring right after it, and the used ring on the next 4 KiB boundary (the device
writes only that page).  Without interrupts the driver sets ``VRING_AVAIL_F_NO_INTERRUPT``
and polls the used index.  x86 keeps stores in program order, so a descriptor and its
avail slot are visible before the avail index that publishes them; the 16-bit indexes
are single loads and stores (ctypes), never split.
"""

from __future__ import annotations

import ctypes
from collections import deque
from collections.abc import Sequence
from typing import Final, NamedTuple

from guest_tests.userspace.dma import DmaBuffer
from protocol.virtqueue import (
    DESC_DTYPE,
    USED_ELEM_DTYPE,
    AvailFlag,
    DescFlag,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
)

__all__ = ["RingBuffer", "SplitRing", "ring_bytes"]

_USED_ALIGN: Final = 4096


class RingBuffer(NamedTuple):
    """One buffer of a chain: guest-physical address, length, device-writable."""

    phys: int
    length: int
    writable: bool = False


def _used_offset(size: int) -> int:
    return -(-(desc_table_size(size) + avail_ring_size(size)) // _USED_ALIGN) * _USED_ALIGN


def ring_bytes(size: int) -> int:
    """DMA bytes a ring of ``size`` entries needs."""
    return _used_offset(size) + used_ring_size(size)


class SplitRing:
    """Descriptors, available ring and used ring of queue ``index``."""

    def __init__(self, index: int, size: int, memory: DmaBuffer) -> None:
        if memory.size < ring_bytes(size) or memory.offset % _USED_ALIGN:
            raise ValueError(f"ring of {size} needs {ring_bytes(size)} page-aligned bytes")
        self.index = index
        self.size = size
        self.memory = memory
        raw = memory.array
        raw[:] = 0
        avail_at, used_at = desc_table_size(size), _used_offset(size)
        self.desc = raw[:avail_at].view(DESC_DTYPE)
        self.avail_ring = raw[avail_at + 4:avail_at + 4 + 2 * size].view("<u2")
        self.used_ring = raw[used_at + 4:used_at + 4 + 8 * size].view(USED_ELEM_DTYPE)
        base = memory.address
        self._avail_flags = ctypes.c_uint16.from_address(base + avail_at)
        self._avail_idx = ctypes.c_uint16.from_address(base + avail_at + 2)
        self._used_idx = ctypes.c_uint16.from_address(base + used_at + 2)
        self.addresses = (memory.phys, memory.phys + avail_at, memory.phys + used_at)
        self._free: deque[int] = deque(range(size))
        self._chains: dict[int, list[int]] = {}
        self.next_avail = 0
        self.last_used = 0
        self._avail_flags.value = int(AvailFlag.NO_INTERRUPT)

    # --- building chains ------------------------------------------------------------

    @property
    def free_descriptors(self) -> int:
        """Descriptors not held by an in-flight chain."""
        return len(self._free)

    def take(self, count: int) -> list[int]:
        """Reserve ``count`` descriptors (raw chains write them with :meth:`write`)."""
        if count > len(self._free):
            raise MemoryError(f"queue {self.index}: {count} descriptors wanted, "
                              f"{len(self._free)} free")
        return [self._free.popleft() for _ in range(count)]

    def write(self, index: int, phys: int, length: int, flags: int, next_index: int) -> None:
        """Write descriptor ``index`` as given (no checks: hostile tests use this)."""
        self.desc[index] = (phys, length, flags, next_index)

    def add(self, buffers: Sequence[RingBuffer]) -> int:
        """Queue a chain (readable buffers first); returns its head, not yet published."""
        if not buffers:
            raise ValueError("a chain needs at least one buffer")
        indexes = self.take(len(buffers))
        for position, (index, buf) in enumerate(zip(indexes, buffers, strict=True)):
            last = position == len(buffers) - 1
            flags = (int(DescFlag.WRITE) if buf.writable else 0) | \
                (0 if last else int(DescFlag.NEXT))
            self.write(index, buf.phys, buf.length, flags, 0 if last else indexes[position + 1])
        self._chains[indexes[0]] = indexes
        return indexes[0]

    def add_indirect(self, table: DmaBuffer, buffers: Sequence[RingBuffer]) -> int:
        """Queue a chain as one INDIRECT descriptor whose table lives in ``table``."""
        entries = table.array[:16 * len(buffers)].view(DESC_DTYPE)
        for position, buf in enumerate(buffers):
            last = position == len(buffers) - 1
            flags = (int(DescFlag.WRITE) if buf.writable else 0) | \
                (0 if last else int(DescFlag.NEXT))
            entries[position] = (buf.phys, buf.length, flags, 0 if last else position + 1)
        head = self.take(1)[0]
        self.write(head, table.phys, 16 * len(buffers), int(DescFlag.INDIRECT), 0)
        self._chains[head] = [head]
        return head

    def adopt(self, head: int, indexes: Sequence[int]) -> None:
        """Record a raw chain's descriptors (from :meth:`take`), so a completion frees them."""
        self._chains[head] = list(indexes)

    def publish(self, head: int) -> None:
        """Make ``head`` available: the ring slot first, then the index."""
        self.avail_ring[self.next_avail % self.size] = head
        self.next_avail = (self.next_avail + 1) & 0xFFFF
        self._avail_idx.value = self.next_avail

    def publish_index(self, index: int) -> None:
        """Store ``index`` as the avail index as is (hostile tests: jumps past the ring)."""
        self.next_avail = index & 0xFFFF
        self._avail_idx.value = self.next_avail

    # --- completions ----------------------------------------------------------------

    @property
    def used_index(self) -> int:
        """The device's used index (one 16-bit load)."""
        return int(self._used_idx.value)

    def completions(self) -> list[tuple[int, int]]:
        """New used elements as ``(head, written)``; their descriptors are freed."""
        used = self.used_index
        count = (used - self.last_used) & 0xFFFF
        slots = [(self.last_used + i) % self.size for i in range(count)]
        done = [(int(self.used_ring[slot]["id"]), int(self.used_ring[slot]["len"]))
                for slot in slots]
        heads = [head for head, _ in done]
        if count > len(self._chains) or len(set(heads)) != count or \
                not set(heads) <= self._chains.keys():
            # nothing is consumed: the state stays as the device left it, for the record
            raise RuntimeError(
                f"queue {self.index}: the device returned unknown head(s): used index "
                f"{used}, last seen {self.last_used}, slots {slots} hold heads {heads}, "
                f"in flight {sorted(self._chains)}")
        for head in heads:
            self._release(head)
        self.last_used = used
        return done

    def _release(self, head: int) -> None:
        indexes = self._chains.pop(head, None)
        if indexes is None:
            raise RuntimeError(f"queue {self.index}: the device returned unknown head {head}")
        self._free.extend(indexes)
