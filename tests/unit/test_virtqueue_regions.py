"""Virtqueues over guest RAM of several regions: where rings, INDIRECT tables and
buffers live, and the cached region the fast paths take them from."""

from __future__ import annotations

import os
import struct
from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from protocol.errors import GuestProtocolError
from protocol.limits import Limits
from protocol.vhost_user import MemRegion
from protocol.virtqueue import DescFlag, avail_ring_size, desc_table_size, used_ring_size
from tests.unit.driver_ring import DriverRing, assert_ring_fatal, pop_one
from tests.unit.guest_ram import GuestRam
from vgpu_backend.chains import DescriptorChain
from vgpu_backend.guest_memory import GuestMemory, MemoryRegion
from vgpu_backend.virtqueue import Virtqueue

NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
RAM_SIZE = 1 << 20
HI = 1 << 32           # guest address of the upper region
DATA = 0x10000         # buffers (in either region)
TABLES = 0x80000       # INDIRECT tables (in either region)
OUTSIDE = 0x4000_0000  # not guest RAM
NUM = 8
LAYOUTS: dict[str, list[tuple[int, ...]]] = {
    "one region": [(0, RAM_SIZE)], "two regions": [(0, RAM_SIZE), (HI, RAM_SIZE)],
    # guest byte 0 of each region at an offset in its mapping (QEMU's mmap_offset)
    "mapping offsets": [(0, RAM_SIZE, 0x1800), (HI, RAM_SIZE, 0x3000)]}


@pytest.fixture
def ram2() -> Iterator[GuestRam]:
    """Two regions, the upper one at 4 GiB (not where a region offset is 0)."""
    ram = GuestRam(LAYOUTS["two regions"])
    yield ram
    ram.close()


# --- buffers and ring memory ------------------------------------------------------


@pytest.mark.parametrize("flags", [0, WRITE], ids=["readable", "writable"])
def test_buffer_split_over_adjacent_regions(flags: int) -> None:
    """A buffer running from one region into the next (contiguous in guest-physical
    space) gets both parts, in order."""
    ram = GuestRam([(0, 0x20000), (0x20000, 0x10000, 100)])
    ring = DriverRing(ram, NUM, 0x1000)
    try:
        queue = ring.queue()
        ram.write(0x1FFFC, b"0123")
        ram.write(0x20000, b"4567")
        ring.set_desc(0, 0x1FFFC, 8, flags)
        ring.publish(0)
        chain = pop_one(queue)
        assert chain.error is None and chain.writable_ok
        if flags:
            assert (len(chain.inp), chain.in_len) == (2, 8)
            assert chain.write(b"abcdefgh") == 8
            assert ram.read(0x1FFFC, 8) == b"abcdefgh"
        else:
            assert (len(chain.out), chain.out_len) == (2, 8)
            assert chain.read(8) == b"01234567"
    finally:
        ring.close()
        ram.close()


@pytest.mark.parametrize("flags", [0, WRITE], ids=["readable", "writable"])
@pytest.mark.parametrize("past_end", [1, 4], ids=["one byte", "four bytes"])
@pytest.mark.parametrize("beyond", ["the next region", "the end of RAM"])
def test_a_buffer_leaving_the_cached_region_is_never_cut_short(
        flags: int, past_end: int, beyond: str) -> None:
    """A first buffer makes its region the cached one; the second starts in it and runs
    on: into the adjacent region it is split (every byte present), past the end of RAM
    it is an error (and a writable one makes the chain unwritable), never a view shorter
    than the length counted."""
    layout = [(0, 0x20000), (0x20000, 0x10000, 100)] if beyond == "the next region" \
        else [(0, 0x20000)]
    ram = GuestRam(layout)
    ring = DriverRing(ram, NUM, 0x1000)
    try:
        queue = ring.queue()
        ring.set_desc(0, DATA, 16, NEXT, 1)  # inside the first region: cached
        ring.set_desc(1, 0x20000 - 8, 8 + past_end, flags)
        ring.publish(0)
        chain = pop_one(queue)
        views = chain.inp if flags else chain.out
        if beyond == "the next region":
            assert chain.error is None and chain.writable_ok
            assert sum(len(v) for v in chain.out) == chain.out_len
            assert sum(len(v) for v in chain.inp) == chain.in_len == (8 + past_end if flags
                                                                      else 0)
            assert [len(v) for v in views[-2:]] == [8, past_end]
        else:
            assert chain.error is not None
            assert chain.writable_ok is not bool(flags)
            assert sum(len(v) for v in views) != 8 + past_end  # nothing of it was kept
    finally:
        ring.close()
        ram.close()


def test_an_indirect_table_one_byte_past_the_cached_region_is_ring_fatal() -> None:
    """Its region is the cached one (a chain popped before lives there): the table
    must still lie inside it, to the last byte."""
    ram = GuestRam([(0, 0x20000)])
    ring = DriverRing(ram, NUM, 0x1000)
    try:
        queue = ring.queue()
        ring.set_desc(0, DATA, 16)
        ring.publish(0)
        pop_one(queue)
        ring.set_desc(1, 0x20000 - 31, 32, INDIRECT)
        ring.publish(1)
        assert_ring_fatal(queue, "INDIRECT table")
    finally:
        ring.close()
        ram.close()


@pytest.mark.parametrize("room", ["one byte short", "8 bytes"])
@pytest.mark.parametrize("which", ["desc", "avail", "used"])
def test_a_ring_running_past_the_end_of_ram_is_not_mapped(ram2: GuestRam, which: str,
                                                          room: str) -> None:
    """A ring that does not fit before the end of its region (for this queue size) is
    refused when the front-end sets it up: the queue stays unmapped, never ready."""
    size = {"desc": desc_table_size, "avail": avail_ring_size, "used": used_ring_size}[which]
    at = {"desc": 0x1000, "avail": 0x2000, "used": 0x3000}
    at[which] = RAM_SIZE - (size(NUM) - 1 if room == "one byte short" else 8)
    queue = Virtqueue(0, ram2.memory, Limits())
    queue.set_num(NUM)
    queue.set_addr(ram2.qva(at["desc"]), ram2.qva(at["used"]), ram2.qva(at["avail"]))
    queue.started = queue.enabled = True
    assert not queue.mapped and not queue.ready
    at[which] = HI + 0x4000  # the same ring elsewhere maps
    queue.set_addr(ram2.qva(at["desc"]), ram2.qva(at["used"]), ram2.qva(at["avail"]))
    assert queue.ready


@pytest.mark.parametrize("removed", ["descriptor table's", "avail and used rings'"])
def test_rings_over_two_regions_are_unmapped_with_either(removed: str) -> None:
    """Descriptor table in one region, avail and used rings in another: the queue uses
    both, and is unmapped when either goes (not when a region it does not use goes)."""
    ram = GuestRam([(0, RAM_SIZE), (HI, RAM_SIZE), (2 * HI, RAM_SIZE)])

    def region_unmapping(region: MemoryRegion) -> None:  # as the device does
        if queue.uses_region(region):
            queue.drop_memory()

    def remove(region: MemoryRegion) -> None:
        assert ram.memory.remove(
            MemRegion(region.gpa, region.size, region.uaddr, region.mmap_offset))

    try:
        queue = Virtqueue(0, ram.memory, Limits())
        ram.memory.add_unmap_listener(region_unmapping)
        queue.set_num(NUM)
        queue.set_addr(ram.qva(0x1000), ram.qva(HI + 0x1000), ram.qva(HI + 0x2000))
        regions = ram.memory.regions
        assert queue.mapped
        assert [queue.uses_region(r) for r in regions] == [True, True, False]
        remove(regions[2])
        assert queue.mapped
        remove(regions[0 if removed == "descriptor table's" else 1])
        assert not queue.mapped
    finally:
        ram.close()


# --- chains taken from the cached region ----------------------------------------------

#: (readable, writable, table) region base of each chain: the cached region is often
#: above the next chain's memory, and chains mix both regions
PLAN = [(HI, HI, HI), (HI, HI, HI), (HI, 0, HI), (0, 0, 0), (0, HI, 0), (0, HI, HI),
        (HI, HI, 0), (0, 0, HI)]


@pytest.mark.parametrize("batch", [1, 0xFFFF], ids=["one by one", "one batch"])
@pytest.mark.parametrize("ring_at", [0x1000, HI + 0x1000], ids=["ring low", "ring high"])
@pytest.mark.parametrize("indirect", [False, True], ids=["direct", "indirect"])
def test_chains_in_either_region_view_exactly_their_bytes(ram2: GuestRam, ring_at: int,
                                                          indirect: bool, batch: int) -> None:
    """Command -> response pairs (fast path material) with tables and buffers in the
    upper region, the lower one and both: each buffer is exactly its guest bytes."""
    num = 2 * len(PLAN)
    ring = DriverRing(ram2, num, ring_at)
    try:
        queue = ring.queue()
        for i, (readable, writable, table) in enumerate(PLAN):
            src, dst = readable + DATA + 0x100 * i, writable + DATA + 0x100 * i + 0x80
            ram2.write(src, bytes([i + 1]) * 4 + b"cmd%d" % i)
            if indirect:
                ring.write_table(table + TABLES + 32 * i, [(src, 8, NEXT, 1), (dst, 8, WRITE, 0)])
                ring.set_desc(i, table + TABLES + 32 * i, 32, INDIRECT)
            else:
                ring.set_desc(i, src, 8, NEXT, len(PLAN) + i)
                ring.set_desc(len(PLAN) + i, dst, 8, WRITE)
        ring.publish(*range(len(PLAN)))
        chains: list[DescriptorChain] = []
        while more := queue.pop_batch(batch):
            chains += more
        assert [c.head for c in chains] == list(range(len(PLAN)))
        for i, (chain, (_, writable, _)) in enumerate(zip(chains, PLAN, strict=True)):
            assert chain.error is None and (chain.out_len, chain.in_len) == (8, 8)
            assert chain.read(8) == bytes([i + 1]) * 4 + b"cmd%d" % i
            assert chain.write(b"response") == 8
            assert ram2.read(writable + DATA + 0x100 * i + 0x80, 8) == b"response"
    finally:
        ring.close()


# --- the two-descriptor fast paths agree with the general walk ------------------------


@pytest.fixture(params=list(LAYOUTS.values()), ids=list(LAYOUTS))
def ram(request: pytest.FixtureRequest) -> Iterator[GuestRam]:
    ram = GuestRam(request.param)
    yield ram
    ram.close()


def outcome(pop: Callable[[], DescriptorChain | None]) -> tuple[object, ...]:
    """What a walk makes of a chain: the buffers' bytes and lengths, or the error."""
    try:
        chain = pop()
    except GuestProtocolError as err:
        return ("fatal", str(err), err.ring_fatal)
    assert chain is not None
    return (chain.head, [bytes(b) for b in chain.out], [bytes(b) for b in chain.inp],
            chain.out_len, chain.in_len, chain.writable_ok,
            None if chain.error is None else str(chain.error))


def popped(queue: Virtqueue, ring: DriverRing) -> tuple[object, ...]:
    """Head 0 as the ring's pop (with its fast paths) makes it."""
    queue.last_avail = ring.avail_idx
    ring.publish(0)
    return outcome(queue.pop)


def walked(queue: Virtqueue) -> tuple[object, ...]:
    """Head 0 as the general walk makes it."""
    return outcome(lambda: queue._walk_any(0))


ADDRS = st.sampled_from([DATA, DATA + 0x7F0, RAM_SIZE - 8, RAM_SIZE - 4, RAM_SIZE, OUTSIDE,
                         0x1_0000_0000_0000 - 4, 2**64 - 8])
DESC = st.tuples(ADDRS, st.sampled_from([0, 1, 8, 24, 0x800, 2**32 - 1]),
                 st.sampled_from([0, NEXT, WRITE, NEXT | WRITE, INDIRECT, NEXT | INDIRECT,
                                  0x8]),
                 st.integers(0, NUM + 1))
#: mostly the shape the fast path takes (readable, then writable, in RAM), else anything
GOOD_ADDR = st.sampled_from([DATA, DATA + 0x7F0, RAM_SIZE - 24])
GOOD_LEN = st.sampled_from([8, 24])
FIRST = st.one_of(st.tuples(GOOD_ADDR, GOOD_LEN, st.just(NEXT), st.sampled_from([1, 2, 5])),
                  DESC)
SECOND = st.one_of(st.tuples(GOOD_ADDR, GOOD_LEN, st.just(WRITE), st.integers(0, NUM + 1)),
                   DESC)
#: the region an address below RAM_SIZE is moved to (outside RAM on one region)
UP = st.sampled_from([0, HI])


def up(desc: tuple[int, int, int, int], offset: int) -> tuple[int, int, int, int]:
    """``desc`` with its address moved by ``offset`` if it is in the lower region."""
    addr, length, flags, nxt = desc
    return (addr + offset if addr < RAM_SIZE else addr), length, flags, nxt


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
# the INDIRECT pair the pop takes without the walk, in the cached region, in either
# region (the search finds these only now and then)
@example(first=(DATA, 8, NEXT, 1), second=(DATA + 0x7F0, 24, WRITE, 0), indirect=True,
         table_at=TABLES, moves=(0, 0, 0, 0), cached=0)
@example(first=(DATA, 24, NEXT, 1), second=(DATA + 0x7F0, 8, WRITE, 0), indirect=True,
         table_at=TABLES, moves=(HI, HI, HI, HI), cached=-1)
@given(first=FIRST, second=SECOND, indirect=st.booleans(),
       table_at=st.sampled_from([TABLES, RAM_SIZE - 16, OUTSIDE]),
       moves=st.tuples(UP, UP, UP, UP), cached=st.sampled_from([0, -1]))
def test_fast_path_agrees_with_the_general_walk(ram: GuestRam,
                                                first: tuple[int, int, int, int],
                                                second: tuple[int, int, int, int],
                                                indirect: bool, table_at: int,
                                                moves: tuple[int, int, int, int],
                                                cached: int) -> None:
    """On one region at 0, and on two with the ring, the table and each buffer in
    either (the cached region then often lies above the chain's memory)."""
    two = len(ram.regions) == 2
    ring_move, table_move, first_move, second_move = moves if two else (0, 0, 0, 0)
    first, second = up(first, first_move), up(second, second_move)
    table_at = table_at + table_move if table_at < RAM_SIZE else table_at
    ring = DriverRing(ram, NUM, 0x1000 + ring_move)
    try:
        queue = ring.queue()
        if indirect:
            if table_at != OUTSIDE:
                ring.write_table(table_at, [first, second][:2 if table_at % HI == TABLES else 1])
            ring.set_desc(0, table_at, 32, INDIRECT)
        else:
            ring.set_desc(0, *first)
            ring.set_desc(first[3] % NUM, *second)
        for base in (0, HI) if two else (0,):
            ram.write(base + DATA, bytes(range(256))[::-1 if base else 1] * 8)
        queue._last_region = None  # both walks start from the same cache state
        general = walked(queue)
        queue._last_region = None
        assert popped(queue, ring) == general
        queue._last_region = queue._memory.regions[cached]  # and with a region cached
        fast = popped(queue, ring)
        queue._last_region = queue._memory.regions[cached]
        assert fast == walked(queue)
    finally:
        ring.close()


def test_rings_addressed_before_their_memory_map_when_it_arrives() -> None:
    """SET_VRING_ADDR before the memory holding the rings: the queue maps once the
    memory table has them, and takes the used index from the ring then."""
    memory = GuestMemory()
    queue = Virtqueue(0, memory, Limits())
    queue.set_num(NUM)
    qva, used = 0x7F00_0000_0000, 0x2000
    queue.set_addr(qva, qva + used, qva + 0x1000)
    assert not queue.mapped
    fd = os.memfd_create("vgpu-test-ram", os.MFD_CLOEXEC)
    try:
        os.ftruncate(fd, RAM_SIZE)
        os.pwrite(fd, struct.pack("<H", 7), used + 2)  # used.idx, as QEMU left it
        memory.add(MemRegion(0, RAM_SIZE, qva, 0), os.dup(fd), max_regions=4)
        queue.map_rings()
        assert queue.mapped and queue.used_idx == 7
        queue.push(3, 16)
        assert struct.unpack("<H", os.pread(fd, 2, used + 2))[0] == 8
        queue.map_rings()  # a later memory change keeps the device's own index
        assert queue.used_idx == 8
    finally:
        queue.drop_memory()
        memory.clear()
        os.close(fd)
