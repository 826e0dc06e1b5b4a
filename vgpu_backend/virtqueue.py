"""Split virtqueues in guest memory: popping descriptor chains, pushing used entries.

Two kinds of guest mistakes are distinguished:

* the ring itself is corrupt (avail index jumping by more than the ring size, a head
  or ``next`` index out of range, a loop, a bad or nested INDIRECT table, ring memory
  outside guest RAM): :class:`GuestProtocolError` with ``ring_fatal``; the queue is
  marked broken and processes nothing until the front-end sets it up again;
* one chain's buffers are bad (outside guest RAM, readable after writable): the chain
  is still returned, with :attr:`~vgpu_backend.chains.DescriptorChain.error` set, so
  the device can answer it with an error (or a zero-length used entry) and go on.
"""

from __future__ import annotations

import contextlib
import logging
import mmap
import os
import struct
import sys

import numpy as np
import numpy.typing as npt

from protocol.errors import FrontendProtocolError, GuestProtocolError
from protocol.limits import Limits
from protocol.virtio_gpu_codes import Resp
from protocol.virtqueue import (
    AvailFlag,
    DescFlag,
    VirtqDesc,
    VirtqUsedElem,
    avail_ring_size,
    desc_table_size,
    used_ring_size,
    vring_need_event,
)
from protocol.wire import layout
from vgpu_backend.chains import ChainBatch, DescriptorChain, PairItem
from vgpu_backend.guest_memory import GuestMemory, MemoryRegion

__all__ = ["Virtqueue"]

log = logging.getLogger(__name__)

Bytes = npt.NDArray[np.uint8]
_NEXT, _WRITE, _INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
_NO_INTERRUPT = int(AvailFlag.NO_INTERRUPT)
#: codecs derived from the ``@wire`` declarations in protocol.virtqueue
_DESC = layout(VirtqDesc).struct
_USED_ELEM = layout(VirtqUsedElem).struct
if sys.byteorder != "little":  # the ring indices are read and stored as native u16
    raise ImportError("virtio rings are little-endian: this host is not")
#: two descriptors at once: the command + response pair nearly every chain is
_DESC_PAIR = struct.Struct("<QIHHQIHH")
_NO_MAPPING = mmap.mmap(-1, 1)  # a placeholder until a region is known


def _ring_fatal(message: str) -> GuestProtocolError:
    return GuestProtocolError(message, Resp.ERR_UNSPEC, ring_fatal=True)


class Virtqueue:
    """Device side of one split virtqueue."""

    def __init__(self, index: int, memory: GuestMemory, limits: Limits) -> None:
        self.index = index
        self._memory = memory
        self._limits = limits
        self.num = 0
        self.addr: tuple[int, int, int] | None = None  # desc, avail, used (QEMU VAs)
        self.last_avail = 0
        self.used_idx = 0
        self.kick_fd: int | None = None
        self.call_fd: int | None = None
        self.err_fd: int | None = None
        self.enabled = False
        self.started = False
        self.broken = False
        self.event_idx = False
        self._signalled_used = 0
        self._signalled_valid = False
        self._mapped = False
        self._used_idx_from_ring = False  # set_addr: read used.idx at the next mapping
        self._region_ids: set[int] = set()
        self._last_region: MemoryRegion | None = None
        self._pairs_allowed = limits.max_indirect_descriptors >= 2

    # --- configuration (vhost-user requests) ---------------------------------------

    @property
    def mapped(self) -> bool:
        """The rings are mapped (responses can be written)."""
        return self._mapped

    @property
    def ready(self) -> bool:
        """Configured, started, enabled, mapped and not broken."""
        return self._mapped and self.started and self.enabled and not self.broken

    def set_num(self, num: int) -> None:
        """SET_VRING_NUM: a power of 2 up to the limit.  A split ring's size is always one
        (virtio 1.x, 2.7; Linux's vhost, DPDK and rust-vmm refuse others): the 16-bit
        ring indices wrap at 65536, which only a power of 2 divides."""
        if num == 0 or num & (num - 1) or num > self._limits.max_queue_size:
            raise FrontendProtocolError(
                f"queue {self.index}: bad size {num} (a power of 2 up to "
                f"{self._limits.max_queue_size})")
        self.num = num
        self._unmap()

    def set_base(self, base: int) -> None:
        """SET_VRING_BASE: the next avail index to process."""
        self.last_avail = base & 0xFFFF
        self.broken = False

    def set_addr(self, desc: int, used: int, avail: int) -> None:
        """SET_VRING_ADDR (QEMU virtual addresses); maps the rings now if possible (else
        once the memory table has them).  The used index is read from the ring when
        it is first mapped."""
        self.addr = (desc, avail, used)
        self.broken = False
        self._used_idx_from_ring = True
        self.map_rings()

    def map_rings(self) -> None:
        """(Re)translate the ring addresses after a memory-table change."""
        self._unmap()
        if self.addr is None or self.num == 0:
            return
        desc, avail, used = self.addr
        try:
            d_reg, d_off = self._memory.qva_to_region(desc, desc_table_size(self.num))
            a_reg, a_off = self._memory.qva_to_region(avail, avail_ring_size(self.num))
            u_reg, u_off = self._memory.qva_to_region(used, used_ring_size(self.num))
        except GuestProtocolError as err:
            log.warning("queue %d: rings not mapped yet: %s", self.index, err)
            return
        n = self.num
        self._desc = d_reg.view[d_off:d_off + desc_table_size(n)]
        self._avail = a_reg.view[a_off:a_off + avail_ring_size(n)]
        self._used = u_reg.view[u_off:u_off + used_ring_size(n)]
        # The indices the driver polls while we run (used.idx, avail_event) are
        # stored through native 16-bit views: one store each.  struct's pack_into
        # zeroes its target before it writes the value, so a driver polling on
        # another CPU could see 0 in between (a guest saw used.idx go from 3 to 0).
        self._avail_u16 = self._avail.cast("H")
        self._used_u16 = self._used.cast("H")
        self._avail_event_at = 2 + 4 * n  # u16 index of used->avail_event
        self._used_event_at = 2 + n  # u16 index of avail->used_event
        self._region_ids = {d_reg.id, a_reg.id, u_reg.id}
        self._mapped = True
        if self._used_idx_from_ring:
            self._used_idx_from_ring = False
            self.used_idx = self._used_u16[1]
            self._signalled_valid = False

    def uses_region(self, region: MemoryRegion) -> bool:
        """The rings live in ``region``."""
        return region.id in self._region_ids

    def _unmap(self) -> None:
        if self._mapped:
            del self._desc, self._avail, self._used, self._avail_u16, self._used_u16
        self._mapped = False
        self._region_ids = set()

    def drop_memory(self) -> None:
        """Forget the ring views (their memory is going away)."""
        self._unmap()
        self._last_region = None

    def stop(self) -> int:
        """GET_VRING_BASE: stop the ring and return the next avail index."""
        self.started = False
        self.enabled = False
        return self.last_avail

    def mark_broken(self, reason: str) -> None:
        """Refuse further processing until the front-end sets the ring up again."""
        if not self.broken:
            log.error("queue %d is broken and stops: %s", self.index, reason)
        self.broken = True

    # --- processing ----------------------------------------------------------------

    def pending(self) -> int:
        """Number of chains the driver made available that we have not popped."""
        return (self._avail_u16[1] - self.last_avail) & 0xFFFF

    def pop(self) -> DescriptorChain | None:
        """The next available chain, or ``None`` when the ring is empty.

        :raise GuestProtocolError: (``ring_fatal``) the ring is corrupt.
        """
        chains = self.pop_batch(1)
        return chains[0] if chains else None

    def pop_batch(self, limit: int = 0xFFFF) -> ChainBatch:
        """The chains available now (at most ``limit``), in ring order; empty when
        there is none.

        A corrupt ring raises only when it is the first thing found: chains popped
        before it are returned, and the next call raises.  The batch is valid until
        the memory table next changes (see :class:`ChainBatch`).  Chains the caller
        does not get to run go back with :meth:`unpop`.

        With EVENT_IDX, ``avail_event`` is published only when the ring is found
        empty (as Linux's vhost does): while the device works through what is
        available it will look again anyway, so the driver need not kick.

        :raise GuestProtocolError: (``ring_fatal``) the ring is corrupt.
        """
        pending = self.pending()
        if pending == 0:
            if self.event_idx:
                self._used_u16[self._avail_event_at] = self.last_avail
                pending = self.pending()  # re-check after publishing
            if pending == 0:
                return ChainBatch()
        num = self.num
        if pending > num:
            raise _ring_fatal(f"avail index moved by {pending} on a ring of {num}")
        pending = min(pending, limit)
        chains: list[DescriptorChain | PairItem] = []
        avail, table, last = self._avail_u16, self._desc, self.last_avail
        unpack_desc = _DESC.unpack_from
        pairs, gpa, end, view, mapping, at = self._pair_window()
        for _ in range(pending):
            head = avail[2 + last % num]
            try:
                if head >= num:
                    raise _ring_fatal(f"head index {head} >= queue size {num}")
                addr, length, flags, _next = unpack_desc(table, 16 * head)
                # Linux's INDIRECT table of two in the last-used region: _simple_pair
                # inlined (this loop is the hottest; a differential test holds the
                # outcome equal to the general walk's)
                if flags == _INDIRECT and length == 32 and pairs and \
                        gpa <= addr and addr + 32 <= end:
                    a0, l0, f0, n0, a1, l1, f1, _ = _DESC_PAIR.unpack_from(view, addr - gpa)
                    if f0 == _NEXT and n0 == 1 and f1 == _WRITE and l0 and l1 and \
                            gpa <= a0 and a0 + l0 <= end and gpa <= a1 and a1 + l1 <= end:
                        chains.append((head, mapping, a0 + at, l0, a1 + at, l1))
                        last = (last + 1) & 0xFFFF
                        continue
                chains.append(self._walk(head))
                # the general walk may have moved to another region
                pairs, gpa, end, view, mapping, at = self._pair_window()
            except GuestProtocolError:
                if not chains:
                    raise
                break  # the chains before the corrupt one are served first
            last = (last + 1) & 0xFFFF
        self.last_avail = last
        return ChainBatch(chains)

    def _pair_window(self) -> tuple[bool, int, int, memoryview, mmap.mmap, int]:
        """Where the pop takes INDIRECT pairs without the walk: (whether it may, the
        last-used region's first and end guest addresses, its view and mapping, and
        mapping offset minus guest address)."""
        region = self._last_region
        if region is None or region.fd < 0:
            return False, 0, 0, memoryview(b""), _NO_MAPPING, 0
        return (self._pairs_allowed, region.gpa, region.gpa + region.size, region.view,
                region.mapping, region.mmap_offset - region.gpa)

    def unpop(self, count: int) -> None:
        """Give the last ``count`` popped chains back: they are popped again later
        (the driver may not touch them: they are neither used nor free)."""
        self.last_avail = (self.last_avail - count) & 0xFFFF

    def _walk(self, head: int) -> DescriptorChain | PairItem:
        addr, length, flags, nxt = _DESC.unpack_from(self._desc, 16 * head)
        if flags == _NEXT and nxt < self.num:  # a direct command -> response pair
            a1, l1, f1, n1 = _DESC.unpack_from(self._desc, 16 * nxt)
            chain = self._simple_pair(head, (addr, length, flags, nxt, a1, l1, f1, n1),
                                      head, nxt)
            if chain is not None:
                return chain
        return self._walk_any(head)

    def _simple_pair(self, head: int, pair: tuple[int, ...], first: int,
                     second: int) -> PairItem | None:
        """The chain, as offsets, when ``pair`` is exactly one readable then one
        writable buffer in the last-used region (no loop possible: ``first`` links to
        ``second``, which ends the chain); None sends the chain down the general walk."""
        a0, l0, f0, n0, a1, l1, f1, _ = pair
        region = self._last_region
        if f0 != _NEXT or n0 != second or f1 != _WRITE or second == first or not l0 or \
                not l1 or region is None or region.fd < 0:
            return None
        gpa, end = region.gpa, region.gpa + region.size
        if not (gpa <= a0 and a0 + l0 <= end and gpa <= a1 and a1 + l1 <= end):
            return None
        at = region.mmap_offset - gpa  # guest address -> offset in the mapping
        return head, region.mapping, a0 + at, l0, a1 + at, l1

    def _walk_any(self, head: int) -> DescriptorChain:
        chain = DescriptorChain(head)
        table = self._desc
        table_len = self.num
        index = head
        seen = 0
        indirect = False
        while True:
            seen += 1
            if seen > table_len:
                raise _ring_fatal(f"descriptor chain from head {head} loops")
            addr, length, flags, nxt = _DESC.unpack_from(table, 16 * index)
            if flags & _INDIRECT:
                if indirect or flags & _NEXT:
                    raise _ring_fatal(f"head {head}: nested or chained INDIRECT descriptor")
                if length == 0 or length % 16 or length // 16 > \
                        self._limits.max_indirect_descriptors:
                    raise _ring_fatal(f"head {head}: INDIRECT table of {length} bytes")
                try:
                    region, off = self._region_of(addr, length)
                except GuestProtocolError as err:
                    raise _ring_fatal(f"head {head}: INDIRECT table: {err}") from None
                table = region.view[off:off + length]
                table_len, index, seen, indirect = length // 16, 0, 0, True
                continue
            if length:
                self._add_buffer(chain, addr, length, bool(flags & _WRITE))
            if not flags & _NEXT:
                return chain
            index = nxt
            if index >= table_len:
                raise _ring_fatal(f"head {head}: next index {index} >= {table_len}")

    def _region_of(self, addr: int, length: int) -> tuple[MemoryRegion, int]:
        region = self._last_region  # most buffers live in the region of the previous one
        if region is not None and region.gpa <= addr and addr + length <= region.gpa + \
                region.size and region.fd >= 0:
            return region, addr - region.gpa
        region, off = self._memory.gpa_to_region(addr, length)
        self._last_region = region
        return region, off

    def _add_buffer(self, chain: DescriptorChain, addr: int, length: int,
                    writable: bool) -> None:
        if not writable and chain.inp:
            chain.error = chain.error or GuestProtocolError(
                "readable descriptor after a writable one")
            return
        region = self._last_region
        if region is not None and region.gpa <= addr and \
                addr + length <= region.gpa + region.size and region.fd >= 0:
            view = region.view[addr - region.gpa:addr - region.gpa + length]
            if writable:
                chain.inp.append(view)
                chain.in_len += length
            else:
                chain.out.append(view)
                chain.out_len += length
            return
        try:
            region, off = self._region_of(addr, length)
            views = [region.view[off:off + length]]
        except GuestProtocolError:
            try:
                segs = self._memory.translate(np.array([addr], dtype=np.uint64),
                                              np.array([length], dtype=np.uint64))
            except GuestProtocolError as err:
                chain.error = chain.error or GuestProtocolError(
                    f"buffer {addr:#x}+{length:#x}: {err}")
                chain.writable_ok &= not writable
                return
            views = [self._memory.region(rid).view[o:o + n] for rid, o, n in zip(
                segs.region_id.tolist(), segs.offset.tolist(), segs.length.tolist(),
                strict=True)]
        if writable:
            chain.inp.extend(views)
            chain.in_len += length
        else:
            chain.out.extend(views)
            chain.out_len += length

    def push(self, head: int, written: int) -> None:
        """Return a chain to the driver with ``written`` bytes in its writable part."""
        _USED_ELEM.pack_into(self._used, 4 + 8 * (self.used_idx % self.num), head, written)
        self.used_idx = (self.used_idx + 1) & 0xFFFF
        self._used_u16[1] = self.used_idx  # x86 is TSO: the entry is seen first

    def push_many(self, heads: list[int], written: int) -> None:
        """:meth:`push` for each of ``heads`` in order (``written`` bytes each); the used
        index moves once, after every entry."""
        used, num, idx = self._used, self.num, self.used_idx
        pack = _USED_ELEM.pack_into
        for head in heads:
            pack(used, 4 + 8 * (idx % num), head, written)
            idx = (idx + 1) & 0xFFFF
        self.used_idx = idx
        self._used_u16[1] = idx

    def notify(self) -> None:
        """Signal the call eventfd if the driver wants an interrupt now."""
        if self.call_fd is None or not self._mapped:
            return
        if self.event_idx:
            new, old = self.used_idx, self._signalled_used
            valid, self._signalled_valid = self._signalled_valid, True
            self._signalled_used = new
            if valid and not vring_need_event(
                    self._avail_u16[self._used_event_at], new, old):
                return
        elif self._avail_u16[0] & _NO_INTERRUPT:
            return
        try:
            os.eventfd_write(self.call_fd, 1)
        except OSError as err:
            log.warning("queue %d: call eventfd: %s", self.index, err)

    def drain_kick(self) -> None:
        """Consume the kick eventfd counter."""
        if self.kick_fd is not None:
            with contextlib.suppress(BlockingIOError):
                os.eventfd_read(self.kick_fd)
