"""Driver side of one split virtqueue in simulated guest RAM.

Lays the ring out like Linux/QEMU (descriptor table, available ring right after it,
used ring aligned to 64 bytes), builds direct and INDIRECT chains, publishes the
available index, kicks through the kick eventfd (honouring the device's
``avail_event`` with EVENT_IDX, or ``VRING_USED_F_NO_NOTIFY`` without), publishes
``used_event`` and waits for completions on the call eventfd.  A raw mode writes
arbitrary descriptors, heads and indexes for hostile tests.
"""

from __future__ import annotations

import os
import select
import time
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from protocol.virtqueue import (
    DESC_DTYPE,
    USED_ELEM_DTYPE,
    DescFlag,
    UsedFlag,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
    vring_need_event,
)
from tests.frontend.guest_ram import GuestRam, Segment

__all__ = ["Completion", "QueueTimeoutError", "SplitQueueDriver"]


class QueueTimeoutError(AssertionError):
    """The device did not complete the expected buffers in time."""


@dataclass(frozen=True, slots=True)
class Completion:
    """One used element together with what the driver attached to its chain."""

    head: int
    length: int
    token: object


@dataclass(slots=True)
class _Chain:
    descriptors: list[int]
    indirect_table: Segment | None
    token: object


@dataclass(slots=True)
class QueueStats:
    """Counters for notification tests."""

    kicks: int = 0
    kicks_suppressed: int = 0
    notifications: int = 0
    completions: int = 0
    #: used entries found by polling after a 1 s wait without any notification
    missed_notifications: int = 0
    published: list[int] = field(default_factory=list)


class SplitQueueDriver:
    """One split virtqueue, driver side.

    :param ram: guest RAM holding the ring.
    :param index: queue index (0 = control, 1 = cursor).
    :param num: queue size.
    :param event_idx: VIRTIO_F_EVENT_IDX was negotiated.
    """

    def __init__(self, ram: GuestRam, index: int, num: int, *, event_idx: bool) -> None:
        if num & (num - 1) or not 0 < num <= 32768:
            raise ValueError("queue size must be a power of two <= 32768")
        self.ram = ram
        self.index = index
        self.num = num
        self.event_idx = event_idx
        self.desc_gpa = ram.alloc_contiguous(self.ring_bytes(num))
        self.avail_gpa = self.desc_gpa + desc_table_size(num)
        self.used_gpa = (self.avail_gpa + avail_ring_size(num) + 63) & ~63
        self.desc = ram.view(self.desc_gpa, desc_table_size(num)).view(DESC_DTYPE)
        avail = ram.view(self.avail_gpa, avail_ring_size(num)).view("<u2")
        self.avail_flags, self.avail_idx_word = avail[0:1], avail[1:2]
        self.avail_ring, self.used_event_word = avail[2:2 + num], avail[2 + num:3 + num]
        used = ram.view(self.used_gpa, used_ring_size(num))
        used_words = used[:4].view("<u2")
        self.used_flags, self.used_idx_word = used_words[0:1], used_words[1:2]
        self.used_ring = used[4:4 + 8 * num].view(USED_ELEM_DTYPE)
        self.avail_event_word = used[4 + 8 * num:6 + 8 * num].view("<u2")
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.stats = QueueStats()
        self.reset()

    @staticmethod
    def ring_bytes(num: int) -> int:
        """Bytes of guest RAM the whole ring occupies."""
        avail_end = desc_table_size(num) + avail_ring_size(num)
        return ((avail_end + 63) & ~63) + used_ring_size(num)

    def reset(self) -> None:
        """Zero the ring and forget every chain (what a queue reset does)."""
        self.ram.view(self.desc_gpa, self.ring_bytes(self.num))[:] = 0
        self._free: deque[int] = deque(range(self.num))
        self._chains: dict[int, _Chain] = {}
        self.avail_idx = 0  # shadow: next avail index the driver will publish
        self._published = 0
        self.last_used = 0

    # --- ring addresses (guest-physical) ----------------------------------------------

    @property
    def addresses(self) -> tuple[int, int, int]:
        """``(desc, avail, used)`` guest-physical addresses."""
        return self.desc_gpa, self.avail_gpa, self.used_gpa

    # --- building chains ----------------------------------------------------------------

    def free_descriptors(self) -> int:
        """Descriptors not owned by an in-flight chain."""
        return len(self._free)

    def add(self, out: Sequence[Segment], in_: Sequence[Segment] = (), *,
            indirect: bool = False, token: object = None) -> int:
        """Queue one chain (device-readable ``out`` then device-writable ``in_``).

        Returns the head index.  Nothing is visible to the device until :meth:`publish`.
        """
        segments = [(s, 0) for s in out] + [(s, int(DescFlag.WRITE)) for s in in_]
        if not segments:
            raise ValueError("a chain needs at least one buffer")
        if indirect:
            table_len = 16 * len(segments)
            table_gpa = self.ram.alloc_contiguous(table_len)
            table = self.ram.view(table_gpa, table_len).view(DESC_DTYPE)
            for i, (seg, flags) in enumerate(segments):
                last = i == len(segments) - 1
                table[i] = (seg.gpa, seg.length, flags | (0 if last else DescFlag.NEXT),
                            0 if last else i + 1)
            head = self.take_descriptors(1)[0]
            self.desc[head] = (table_gpa, table_len, DescFlag.INDIRECT, 0)
            chain = _Chain([head], Segment(table_gpa, table_len), token)
        else:
            ids = self.take_descriptors(len(segments))
            for i, (seg, flags) in enumerate(segments):
                last = i == len(segments) - 1
                self.desc[ids[i]] = (seg.gpa, seg.length,
                                     flags | (0 if last else DescFlag.NEXT),
                                     0 if last else ids[i + 1])
            head = ids[0]
            chain = _Chain(ids, None, token)
        self._chains[head] = chain
        self.put_head(head)
        return head

    def take_descriptors(self, count: int) -> list[int]:
        """Reserve ``count`` free descriptor indexes (for raw chains)."""
        if count > len(self._free):
            raise RuntimeError(f"queue {self.index}: {count} descriptors wanted, "
                               f"{len(self._free)} free (wait for completions first)")
        return [self._free.popleft() for _ in range(count)]

    # --- raw (hostile) access ------------------------------------------------------------

    def write_desc(self, i: int, addr: int, length: int, flags: int, next_: int) -> None:
        """Write descriptor ``i`` verbatim."""
        self.desc[i] = (addr, length, flags, next_)

    def claim(self, head: int, token: object = None, descriptors: Sequence[int] = ()) -> None:
        """Tell the driver that a raw chain at ``head`` is in flight (for completions)."""
        for d in descriptors or [head]:
            if d in self._free:
                self._free.remove(d)
        self._chains[head] = _Chain(list(descriptors or [head]), None, token)

    def release(self, head: int) -> None:
        """Return the descriptors of a claimed, no longer submitted chain."""
        chain = self._chains.pop(head)
        self._free.extend(chain.descriptors)

    def put_head(self, head: int) -> None:
        """Write ``head`` into the next available-ring slot (not yet published)."""
        self.avail_ring[self.avail_idx % self.num] = head
        self.avail_idx = (self.avail_idx + 1) & 0xFFFF

    def set_avail_idx(self, value: int) -> None:
        """Store an arbitrary available index (hostile tests)."""
        self.avail_idx = value & 0xFFFF
        self.avail_idx_word[0] = self.avail_idx
        self._published = self.avail_idx

    # --- publishing, kicking -------------------------------------------------------------

    def publish(self) -> bool:
        """Make queued heads visible; return whether the device asked to be kicked."""
        old, new = self._published, self.avail_idx
        self.avail_idx_word[0] = new
        self._published = new
        self.stats.published.append(new)
        if new == old:
            return False
        if self.event_idx:
            return vring_need_event(int(self.avail_event_word[0]), new, old)
        return not int(self.used_flags[0]) & UsedFlag.NO_NOTIFY

    def kick(self) -> None:
        """Signal the kick eventfd."""
        if self.kick_fd is None:
            raise RuntimeError(f"queue {self.index} has no kick fd")
        os.eventfd_write(self.kick_fd, 1)
        self.stats.kicks += 1

    def submit(self, *, force_kick: bool = False) -> bool:
        """Publish, then kick if the device asked for it (or ``force_kick``)."""
        needed = self.publish()
        if needed or force_kick:
            self.kick()
        else:
            self.stats.kicks_suppressed += 1
        return needed

    def avail_event(self) -> int:
        """The device's published ``avail_event`` (EVENT_IDX)."""
        return int(self.avail_event_word[0])

    def set_used_event(self, value: int) -> None:
        """Publish ``used_event``: notify me once used idx passes ``value``."""
        self.used_event_word[0] = value & 0xFFFF

    def set_no_interrupt(self, on: bool) -> None:
        """``VRING_AVAIL_F_NO_INTERRUPT`` (meaningful without EVENT_IDX)."""
        self.avail_flags[0] = 1 if on else 0

    # --- completions --------------------------------------------------------------------

    def used_idx(self) -> int:
        """The device's used index."""
        return int(self.used_idx_word[0])

    def in_flight(self) -> int:
        """Chains the device has not completed yet."""
        return len(self._chains)

    def poll_used(self) -> list[Completion]:
        """Consume every used element the device has published."""
        out = []
        while self.last_used != self.used_idx():
            elem = self.used_ring[self.last_used % self.num]
            head, length = int(elem["id"]), int(elem["len"])
            chain = self._chains.pop(head, None)
            if chain is None:
                raise AssertionError(
                    f"queue {self.index}: device used head {head} that is not in flight")
            self._free.extend(chain.descriptors)
            if chain.indirect_table is not None:
                self.ram.free(chain.indirect_table.gpa, chain.indirect_table.length)
            out.append(Completion(head, length, chain.token))
            self.last_used = (self.last_used + 1) & 0xFFFF
        self.stats.completions += len(out)
        return out

    def drain_notifications(self) -> int:
        """Read (and count) pending call-eventfd signals without blocking."""
        if self.call_fd is None:
            return 0
        got = 0
        while select.select([self.call_fd], [], [], 0)[0]:
            got += os.eventfd_read(self.call_fd)
        self.stats.notifications += got
        return got

    def wait_notification(self, timeout: float) -> int:
        """Wait up to ``timeout`` s for the call eventfd; return the signal count read."""
        if self.call_fd is None:
            raise RuntimeError(f"queue {self.index} has no call fd")
        if not select.select([self.call_fd], [], [], timeout)[0]:
            return 0
        return self.drain_notifications()

    def wait_used(self, count: int, timeout: float = 5.0, *, by_notification: bool = True,
                  publish_used_event: bool = True) -> list[Completion]:
        """Wait until ``count`` more chains completed.

        With ``by_notification`` the driver sleeps on the call eventfd like a guest does;
        used entries that appear without a notification are still collected after 1 s
        and counted in ``stats.missed_notifications``.  Otherwise it busy-polls.
        ``publish_used_event`` writes ``used_event = last used`` first (ask for the next
        completion), as Linux's ``virtqueue_enable_cb`` does.
        """
        deadline = time.monotonic() + timeout
        done: list[Completion] = []
        while True:
            done += self.poll_used()
            if len(done) >= count:
                return done
            if publish_used_event:
                self.set_used_event(self.last_used)
                if self.used_idx() != self.last_used:  # used while we published: consume
                    continue
            left = deadline - time.monotonic()
            if left <= 0:
                raise QueueTimeoutError(
                    f"queue {self.index}: {len(done)}/{count} completions after {timeout}s "
                    f"(avail {self._published}, used {self.used_idx()}, "
                    f"notifications {self.stats.notifications})")
            if by_notification:
                signalled = self.wait_notification(min(left, 1.0))
                if not signalled and self.used_idx() != self.last_used:
                    self.stats.missed_notifications += 1
            else:
                time.sleep(min(left, 0.001))

    def wait_used_raw(self, count: int, timeout: float = 5.0) -> npt.NDArray[np.void]:
        """Wait for ``count`` used elements and consume them without chain bookkeeping.

        For pre-built chains that are re-submitted as they are (benchmarks): asks for
        one notification when the last of them is used (``used_event = target - 1``).
        """
        target = (self.last_used + count) & 0xFFFF
        self.set_used_event(target - 1)
        deadline = time.monotonic() + timeout
        while (self.used_idx() - self.last_used) & 0xFFFF < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise QueueTimeoutError(f"queue {self.index}: used {self.used_idx()}, waiting "
                                        f"for {target}")
            self.wait_notification(min(left, 1.0))
        slots = (self.last_used + np.arange(count)) % self.num
        self.last_used = target
        self.stats.completions += count
        return self.used_ring[slots].copy()

    def descriptors(self) -> npt.NDArray[np.void]:
        """The descriptor table as a structured array (read/write view)."""
        return self.desc
