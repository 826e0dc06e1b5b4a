"""The driver side of a split virtqueue laid out by hand in :class:`GuestRam`.

Everything is written raw, so tests can build any ring, valid or hostile.
"""

from __future__ import annotations

import os
import struct

import pytest

from protocol.errors import GuestProtocolError
from protocol.limits import DEFAULT_LIMITS, Limits
from protocol.virtqueue import avail_ring_size, desc_table_size
from tests.unit.guest_ram import GuestRam
from tests.unit.hang_guard import deadline
from vgpu_backend.chains import DescriptorChain
from vgpu_backend.virtqueue import Virtqueue

__all__ = ["NUM", "RAM_SIZE", "DriverRing", "assert_ring_fatal", "pack_desc", "pop_one"]

#: the size of the ``ram`` fixture's guest RAM (tests/unit/conftest.py)
RAM_SIZE = 1 << 20
#: the size of the ``ring`` fixture's ring
NUM = 8

_DESC = struct.Struct("<QIHH")
_U16 = struct.Struct("<H")
_USED_ELEM = struct.Struct("<II")


def pack_desc(addr: int, length: int, flags: int = 0, next_index: int = 0) -> bytes:
    """One ``struct virtq_desc``."""
    return _DESC.pack(addr, length, flags, next_index)


def assert_ring_fatal(queue: Virtqueue, match: str) -> None:
    """The next pop finds the ring corrupt (``match`` says how), promptly."""
    with deadline(5.0), pytest.raises(GuestProtocolError, match=match) as info:
        queue.pop()
    assert info.value.ring_fatal


def pop_one(queue: Virtqueue) -> DescriptorChain:
    """The next available chain (there must be one)."""
    chain = queue.pop()
    assert chain is not None
    return chain


class DriverRing:
    """Descriptor table at ``base``, available ring after it, used ring 4 KiB aligned."""

    def __init__(self, ram: GuestRam, num: int, base: int) -> None:
        self.ram = ram
        self.num = num
        self.desc_gpa = base
        self.avail_gpa = base + desc_table_size(num)
        used = self.avail_gpa + avail_ring_size(num)
        self.used_gpa = (used + 0xFFF) & ~0xFFF
        self.avail_idx = 0
        self.seen_used = 0
        self.call_fd = os.eventfd(0, os.EFD_NONBLOCK | os.EFD_CLOEXEC)

    def end(self) -> int:
        """One past the used ring."""
        return self.used_gpa + 6 + 8 * self.num

    # --- device setup (what vhost_session does on SET_VRING_*) ----------------------

    def queue(self, index: int = 0, limits: Limits = DEFAULT_LIMITS) -> Virtqueue:
        """A started, enabled device queue over this ring."""
        queue = Virtqueue(index, self.ram.memory, limits)
        self.attach(queue)
        # as the device does: drop the ring views before their memory goes away
        self.ram.memory.add_unmap_listener(lambda region: queue.drop_memory())
        return queue

    def attach(self, queue: Virtqueue) -> None:
        """Point ``queue`` at this ring and start it."""
        queue.set_num(self.num)
        queue.set_base(0)
        queue.set_addr(self.ram.qva(self.desc_gpa), self.ram.qva(self.used_gpa),
                       self.ram.qva(self.avail_gpa))
        queue.call_fd = self.call_fd
        queue.started = queue.enabled = True

    def reset(self, queue: Virtqueue) -> None:
        """Zero the rings and set ``queue`` up again (what a front-end does after a
        ring broke: stop, then SET_VRING_* anew)."""
        self.ram.write(self.desc_gpa, bytes(self.end() - self.desc_gpa))
        self.avail_idx = self.seen_used = 0
        self.attach(queue)

    def close(self) -> None:
        """Close the call eventfd."""
        os.close(self.call_fd)

    # --- descriptors and the available ring -------------------------------------------

    def set_desc(self, index: int, addr: int, length: int, flags: int = 0,
                 next_index: int = 0) -> None:
        """Write descriptor ``index`` of the table."""
        self.ram.write(self.desc_gpa + 16 * index, pack_desc(addr, length, flags, next_index))

    def write_table(self, gpa: int, descs: list[tuple[int, int, int, int]]) -> None:
        """Write an INDIRECT table of ``(addr, len, flags, next)`` at ``gpa``."""
        self.ram.write(gpa, b"".join(pack_desc(*d) for d in descs))

    def publish(self, *heads: int) -> None:
        """Make chains available."""
        for head in heads:
            slot = self.avail_gpa + 4 + 2 * (self.avail_idx % self.num)
            self.ram.write(slot, _U16.pack(head))
            self.avail_idx = (self.avail_idx + 1) & 0xFFFF
        self.set_avail_idx(self.avail_idx)

    def set_avail_idx(self, value: int) -> None:
        """Write ``avail.idx`` raw."""
        self.ram.write(self.avail_gpa + 2, _U16.pack(value & 0xFFFF))

    def set_avail_flags(self, flags: int) -> None:
        """Write ``avail.flags``."""
        self.ram.write(self.avail_gpa, _U16.pack(flags))

    def set_used_event(self, value: int) -> None:
        """Write ``used_event`` (after ``avail.ring``)."""
        self.ram.write(self.avail_gpa + 4 + 2 * self.num, _U16.pack(value & 0xFFFF))

    # --- the used ring -------------------------------------------------------------

    def used_idx(self) -> int:
        """``used.idx`` as the device last published it."""
        return int(_U16.unpack(self.ram.read(self.used_gpa + 2, 2))[0])

    def avail_event(self) -> int:
        """``avail_event`` (after ``used.ring``)."""
        return int(_U16.unpack(self.ram.read(self.used_gpa + 4 + 8 * self.num, 2))[0])

    def take_used(self) -> list[tuple[int, int]]:
        """Used elements ``(id, len)`` published since the last call."""
        out = []
        while self.seen_used != self.used_idx():
            slot = self.used_gpa + 4 + 8 * (self.seen_used % self.num)
            out.append(_USED_ELEM.unpack(self.ram.read(slot, 8)))
            self.seen_used = (self.seen_used + 1) & 0xFFFF
        return out

    def interrupts(self) -> int:
        """Signals on the call eventfd since the last call."""
        try:
            return os.eventfd_read(self.call_fd)
        except BlockingIOError:
            return 0
