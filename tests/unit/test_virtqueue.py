"""``vgpu_backend.virtqueue`` over rings laid out by hand in memfd guest RAM."""

from __future__ import annotations

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import FrontendProtocolError, GuestProtocolError
from protocol.limits import Limits
from protocol.virtqueue import DescFlag
from tests.unit.driver_ring import (
    NUM,
    RAM_SIZE,
    DriverRing,
    assert_ring_fatal,
    pack_desc,
    pop_one,
)
from tests.unit.guest_ram import GuestRam
from tests.unit.hang_guard import deadline
from vgpu_backend.chains import DescriptorChain
from vgpu_backend.virtqueue import Virtqueue

NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
DATA = 0x10000       # buffers
TABLES = 0x80000     # INDIRECT tables
OUTSIDE = 0x4000_0000  # not guest RAM


# --- valid chains --------------------------------------------------------------------


def test_direct_chain(ram: GuestRam, ring: DriverRing) -> None:
    queue = ring.queue()
    ram.write(DATA, b"request!")
    ring.set_desc(3, DATA, 8, NEXT, 5)
    ring.set_desc(5, DATA + 0x100, 4, NEXT, 6)
    ring.set_desc(6, DATA + 0x200, 16, WRITE)
    ring.publish(3)
    assert queue.pending() == 1
    chain = pop_one(queue)
    assert chain.head == 3 and chain.error is None
    assert (chain.out_len, chain.in_len) == (12, 16)
    assert chain.read(8) == b"request!"
    assert chain.read(100) == b"request!" + bytes(4)
    assert chain.write(b"x" * 20) == 16  # truncated to the writable space
    assert ram.read(DATA + 0x200, 16) == b"x" * 16
    assert queue.pop() is None
    queue.push(chain.head, 16)
    assert ring.take_used() == [(3, 16)]


def test_indirect_chain(ram: GuestRam, ring: DriverRing) -> None:
    queue = ring.queue()
    ram.write(DATA, b"abc")
    ram.write(DATA + 0x40, b"defgh")
    ring.write_table(TABLES, [(DATA + 0x40, 5, NEXT, 2), (DATA + 0x100, 8, WRITE, 0),
                              (DATA, 3, NEXT, 1)])
    ring.set_desc(0, TABLES, 3 * 16, INDIRECT)
    ring.publish(0)
    chain = pop_one(queue)
    assert chain.error is None
    assert chain.read(8) == b"defgh" + b"abc"
    assert chain.read_array(2, 4).tobytes() == b"fgha"
    assert chain.in_len == 8
    with pytest.raises(GuestProtocolError):
        chain.read_array(4, 5)


@pytest.mark.parametrize("sizes", [(8,), (3, 5), (1, 6, 1)])
def test_read_copies_exactly_the_bytes_asked_for(sizes: tuple[int, ...]) -> None:
    data, views, at = memoryview(b"abcdefgh"), [], 0
    for size in sizes:
        views.append(data[at:at + size])
        at += size
    chain = DescriptorChain(0, out=views, out_len=8)
    assert chain.read(4) == b"abcd"
    assert chain.read(4, 2) == b"cdef"
    assert chain.read(100, 6) == b"gh"
    assert chain.read(0) == b""


#: 408 bytes, each position distinguishable from those a buffer's length away
RESPONSE = bytes(i % 251 for i in range(408))


@pytest.mark.parametrize(("sizes", "written"), [((100, 400), 408), ((100, 200), 300),
                                                ((100, 8, 400), 408), ((100, 8, 200), 308),
                                                ((408,), 408), ((500,), 408)])
def test_write_scatters_the_exact_bytes_over_the_writable_buffers(
        sizes: tuple[int, ...], written: int) -> None:
    """Returns the bytes written: all of them, or as many as the buffers hold."""
    buffers = [bytearray(n) for n in sizes]
    chain = DescriptorChain(0, inp=[memoryview(b) for b in buffers], in_len=sum(sizes))
    assert chain.write(RESPONSE) == written
    assert b"".join(buffers) == RESPONSE[:written] + bytes(sum(sizes) - written)


def test_zero_length_descriptors_add_no_buffer(ring: DriverRing) -> None:
    queue = ring.queue()
    ring.set_desc(0, OUTSIDE, 0, NEXT, 1)
    ring.set_desc(1, DATA, 4, WRITE)
    ring.publish(0)
    chain = pop_one(queue)
    assert chain.error is None and (chain.out_len, chain.in_len) == (0, 4)


# --- bad buffers: the chain comes back with .error ----------------------------------------


def test_buffer_outside_guest_ram(ring: DriverRing) -> None:
    queue = ring.queue()
    ring.set_desc(0, OUTSIDE, 24, NEXT, 1)
    ring.set_desc(1, DATA, 24, WRITE)
    ring.set_desc(2, DATA, 4)
    ring.publish(0, 2)
    chain = pop_one(queue)
    assert chain.head == 0 and isinstance(chain.error, GuestProtocolError)
    assert not chain.error.ring_fatal
    assert pop_one(queue).error is None  # the queue goes on


def test_readable_after_writable(ring: DriverRing) -> None:
    queue = ring.queue()
    ring.set_desc(0, DATA, 24, WRITE | NEXT, 1)
    ring.set_desc(1, DATA + 0x100, 24)
    ring.publish(0)
    chain = pop_one(queue)
    assert chain.error is not None and "readable" in str(chain.error)


# --- ring-fatal corruption ---------------------------------------------------------


def test_loop_in_next(ring: DriverRing) -> None:
    queue = ring.queue()
    ring.set_desc(0, DATA, 4, NEXT, 1)
    ring.set_desc(1, DATA, 4, NEXT, 0)
    ring.publish(0)
    assert_ring_fatal(queue, "loops")


def test_self_loop_with_zero_lengths(ring: DriverRing) -> None:
    queue = ring.queue()
    ring.set_desc(2, 0, 0, NEXT, 2)
    ring.publish(2)
    assert_ring_fatal(queue, "loops")


def test_head_out_of_range(ring: DriverRing) -> None:
    queue = ring.queue()
    ring.publish(NUM)
    assert_ring_fatal(queue, "head index")


def test_next_out_of_range(ring: DriverRing) -> None:
    queue = ring.queue()
    ring.set_desc(0, DATA, 4, NEXT, NUM)
    ring.publish(0)
    assert_ring_fatal(queue, "next index")


def warm_up(ring: DriverRing, queue: Virtqueue) -> None:
    """Pop one chain through the general walk: its region is cached (the fast paths)."""
    ring.set_desc(NUM - 1, DATA, 4, WRITE)
    ring.publish(NUM - 1)
    assert pop_one(queue).head == NUM - 1


#: an INDIRECT table that begins with a command -> response pair
PAIR_FIRST = [(DATA, 4, NEXT, 1), (DATA + 0x100, 4, WRITE, 0), (DATA, 4, 0, 0), (DATA, 4, 0, 0)]


@pytest.mark.parametrize("warm", [False, True], ids=["cold", "region cached"])
@pytest.mark.parametrize(("length", "limit"), [(0, 8), (15, 8), (17, 8), (40, 8), (48, 2),
                                               (64, 3)])
def test_bad_indirect_table_length_is_ring_fatal(ring: DriverRing, length: int, limit: int,
                                                 warm: bool) -> None:
    """Not a multiple of 16, or more entries than the limit: ring-fatal, also when the
    region is cached and the table begins with a pair the fast path could take."""
    queue = ring.queue(limits=Limits(max_indirect_descriptors=limit))
    if warm:
        warm_up(ring, queue)
    ring.write_table(TABLES, PAIR_FIRST)
    ring.set_desc(0, TABLES, length, INDIRECT)
    ring.publish(0)
    assert_ring_fatal(queue, f"INDIRECT table of {length} bytes")


@pytest.mark.parametrize("same_batch", [False, True])
def test_indirect_pair_over_a_limit_of_one_is_ring_fatal(ring: DriverRing,
                                                         same_batch: bool) -> None:
    """max_indirect_descriptors=1 refuses a two-entry table also with the region cached,
    by an earlier pop or earlier in the same batch."""
    queue = ring.queue(limits=Limits(max_indirect_descriptors=1))
    ring.set_desc(1, DATA, 4, WRITE)
    ring.write_table(TABLES, PAIR_FIRST[:2])
    ring.set_desc(0, TABLES, 32, INDIRECT)
    ring.publish(1, 0)
    if same_batch:
        assert [c.head for c in queue.pop_batch()] == [1]
    else:
        assert pop_one(queue).head == 1
    assert_ring_fatal(queue, "INDIRECT table of 32 bytes")


@pytest.mark.parametrize(("entries", "ok"), [(3, True), (4, False)])
def test_indirect_table_of_exactly_the_limit_pops(ring: DriverRing, entries: int,
                                                  ok: bool) -> None:
    queue = ring.queue(limits=Limits(max_indirect_descriptors=3))
    ring.write_table(TABLES, [(DATA + 16 * i, 4, NEXT, i + 1) for i in range(entries - 1)]
                     + [(DATA + 0x100, 4, WRITE, 0)])
    ring.set_desc(0, TABLES, 16 * entries, INDIRECT)
    ring.publish(0)
    if ok:
        chain = pop_one(queue)
        assert chain.error is None and (chain.out_len, chain.in_len) == (8, 4)
    else:
        assert_ring_fatal(queue, "INDIRECT table of 64 bytes")


def test_nested_indirect(ring: DriverRing) -> None:
    queue = ring.queue()
    ring.write_table(TABLES, [(DATA, 4, NEXT, 1), (TABLES + 0x100, 16, INDIRECT, 0)])
    ring.write_table(TABLES + 0x100, [(DATA, 4, 0, 0)])
    ring.set_desc(0, TABLES, 32, INDIRECT)
    ring.publish(0)
    assert_ring_fatal(queue, "nested or chained")


def test_indirect_with_next(ring: DriverRing) -> None:
    queue = ring.queue()
    ring.write_table(TABLES, [(DATA, 4, 0, 0)])
    ring.set_desc(0, TABLES, 16, INDIRECT | NEXT, 1)
    ring.set_desc(1, DATA, 4)
    ring.publish(0)
    assert_ring_fatal(queue, "nested or chained")


def test_indirect_table_outside_ram(ring: DriverRing) -> None:
    queue = ring.queue()
    ring.set_desc(0, OUTSIDE, 32, INDIRECT)
    ring.publish(0)
    assert_ring_fatal(queue, "INDIRECT table")


def test_loop_inside_an_indirect_table(ring: DriverRing) -> None:
    queue = ring.queue()
    ring.write_table(TABLES, [(DATA, 4, NEXT, 1), (DATA, 4, NEXT, 0)])
    ring.set_desc(0, TABLES, 32, INDIRECT)
    ring.publish(0)
    assert_ring_fatal(queue, "loops")


def test_indirect_next_out_of_the_table(ring: DriverRing) -> None:
    queue = ring.queue()
    ring.write_table(TABLES, [(DATA, 4, NEXT, 2), (DATA, 4, 0, 0)])
    ring.set_desc(0, TABLES, 32, INDIRECT)
    ring.publish(0)
    assert_ring_fatal(queue, "next index")


def test_avail_index_jumping_past_the_ring(ring: DriverRing) -> None:
    queue = ring.queue()
    ring.set_avail_idx(NUM + 1)
    assert_ring_fatal(queue, "avail index moved")


def test_avail_index_moving_by_exactly_the_ring_size_is_fine(ring: DriverRing) -> None:
    queue = ring.queue()
    for i in range(NUM):
        ring.set_desc(i, DATA, 4)
    ring.publish(*range(NUM))
    assert [pop_one(queue).head for _ in range(NUM)] == list(range(NUM))
    assert queue.pop() is None


# --- front-end set-up (SET_VRING_*) -----------------------------------------------------


@pytest.mark.parametrize(("limit", "sizes_ok", "sizes_bad"), [
    (32768, [1, 2, 8, 32768], [0, 3, 5, 255, 32767, 32769, 65536]),
    (16, [16], [0, 17, 32]), (100, [64], [100, 128])])
def test_set_num_takes_powers_of_2_up_to_the_limit(
        ram: GuestRam, limit: int, sizes_ok: list[int], sizes_bad: list[int]) -> None:
    """A split ring's size is a power of 2 from 1 to max_queue_size; anything else is
    refused and the previous size stays."""
    queue = Virtqueue(0, ram.memory, Limits(max_queue_size=limit))
    for size in sizes_ok:
        queue.set_num(size)
        assert queue.num == size
    for size in sizes_bad:
        with pytest.raises(FrontendProtocolError, match=f"bad size {size} .a power of 2"):
            queue.set_num(size)
        assert queue.num == sizes_ok[-1]


def test_set_addr_maps_the_rings_only_once_sized(ram: GuestRam, ring: DriverRing) -> None:
    """SET_VRING_ADDR before SET_VRING_NUM maps no zero-size queue; a new size unmaps."""
    queue = Virtqueue(0, ram.memory, Limits())
    addrs = ram.qva(ring.desc_gpa), ram.qva(ring.used_gpa), ram.qva(ring.avail_gpa)
    queue.set_addr(*addrs)
    assert not queue.mapped
    queue.set_num(NUM)
    queue.set_addr(*addrs)
    assert queue.mapped
    queue.set_num(NUM)
    assert not queue.mapped


def test_set_base_keeps_16_bits(ring: DriverRing) -> None:
    queue = ring.queue()
    queue.set_base(0x1_0003)
    assert queue.last_avail == 3 and queue.stop() == 3


@pytest.mark.parametrize("again", ["set_base", "set_addr"])
def test_setting_the_ring_up_again_clears_broken(ring: DriverRing, again: str) -> None:
    queue = ring.queue()
    queue.mark_broken("test")
    assert not queue.ready
    if again == "set_base":
        queue.set_base(0)
    else:
        queue.set_addr(ring.ram.qva(ring.desc_gpa), ring.ram.qva(ring.used_gpa),
                       ring.ram.qva(ring.avail_gpa))
    assert queue.ready


# --- hypothesis: random rings never do anything but pop or raise ---------------------

ADDRESSES = st.sampled_from([DATA, DATA + 0x1FF0, TABLES, TABLES + 0x20, OUTSIDE,
                             RAM_SIZE - 8, 0, (1 << 64) - 16])
LENGTHS = st.sampled_from([0, 1, 8, 16, 24, 32, 48, 64, 0x1000, 0xFFFF_FFFF])
DESCS = st.tuples(ADDRESSES, LENGTHS, st.integers(0, 7), st.integers(0, 12))


def pop_until_empty_or_fatal(queue: Virtqueue, num: int, batch: int) -> None:
    """Pop (``batch`` chains at a time) at most ``num + 2`` times: chains, nothing or a
    ring-fatal error only."""
    with deadline(5.0):
        for _ in range(num + 2):
            try:
                chains = queue.pop_batch(batch)
            except GuestProtocolError as err:
                assert err.ring_fatal
                return
            if not chains:
                return
            assert len(chains) <= batch
            for chain in chains:
                assert 0 <= chain.head < num
                assert chain.out_len == sum(len(b) for b in chain.out)
                assert chain.in_len == sum(len(b) for b in chain.inp)
                assert len(chain.read(chain.out_len + 8)) == chain.out_len


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(num=st.sampled_from([1, 2, 4, 8]), table=st.lists(DESCS, min_size=8, max_size=8),
       indirect=st.lists(DESCS, min_size=6, max_size=6),
       heads=st.lists(st.integers(0, 10), max_size=8), avail_idx=st.integers(0, 0xFFFF),
       event_idx=st.booleans(), batch=st.sampled_from([1, 3, 0xFFFF]))
def test_random_rings_pop_or_raise(num: int, table: list[tuple[int, int, int, int]],
                                   indirect: list[tuple[int, int, int, int]],
                                   heads: list[int], avail_idx: int, event_idx: bool,
                                   batch: int) -> None:
    ram = GuestRam([(0, RAM_SIZE)])
    ring = DriverRing(ram, num, 0x1000)
    try:
        queue = ring.queue()
        queue.event_idx = event_idx
        ram.write(ring.desc_gpa, b"".join(pack_desc(*d) for d in table[:num]))
        ram.write(TABLES, b"".join(pack_desc(*d) for d in indirect))
        ring.publish(*heads)
        if avail_idx % 3 == 0:
            ring.set_avail_idx(avail_idx)
        pop_until_empty_or_fatal(queue, num, batch)
    finally:
        ring.close()
        ram.close()
