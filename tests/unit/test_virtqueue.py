"""``vgpu_backend.virtqueue`` over rings laid out by hand in memfd guest RAM."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.errors import GuestProtocolError
from protocol.limits import Limits
from protocol.virtqueue import AvailFlag, DescFlag
from tests.unit.driver_ring import DriverRing, pack_desc
from tests.unit.guest_ram import GuestRam
from tests.unit.hang_guard import deadline
from vgpu_backend.virtqueue import DescriptorChain, Virtqueue

NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
RAM_SIZE = 1 << 20
DATA = 0x10000       # buffers
TABLES = 0x80000     # INDIRECT tables
OUTSIDE = 0x4000_0000  # not guest RAM
NUM = 8


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    ram = GuestRam([(0, RAM_SIZE)])
    yield ram
    ram.close()


@pytest.fixture
def ring(ram: GuestRam) -> Iterator[DriverRing]:
    ring = DriverRing(ram, NUM, 0x1000)
    yield ring
    ring.close()


def pop_one(queue: Virtqueue) -> DescriptorChain:
    chain = queue.pop()
    assert chain is not None
    return chain


def assert_ring_fatal(queue: Virtqueue, match: str) -> None:
    with deadline(5.0), pytest.raises(GuestProtocolError, match=match) as info:
        queue.pop()
    assert info.value.ring_fatal


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


def test_buffer_split_over_adjacent_regions() -> None:
    ram = GuestRam([(0, 0x20000), (0x20000, 0x10000, 100)])
    ring = DriverRing(ram, NUM, 0x1000)
    try:
        queue = ring.queue()
        ram.write(0x1FFFC, b"0123")
        ram.write(0x20000, b"4567")
        ring.set_desc(0, 0x1FFFC, 8)
        ring.publish(0)
        chain = pop_one(queue)
        assert chain.error is None and len(chain.out) == 2
        assert chain.read(8) == b"01234567"
    finally:
        ring.close()
        ram.close()


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


@pytest.mark.parametrize("length", [0, 15, 17, 40])
def test_indirect_length_not_a_multiple_of_16(ring: DriverRing, length: int) -> None:
    queue = ring.queue()
    ring.set_desc(0, TABLES, length, INDIRECT)
    ring.publish(0)
    assert_ring_fatal(queue, "INDIRECT table")


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


def test_indirect_table_over_the_limit(ram: GuestRam) -> None:
    ring = DriverRing(ram, NUM, 0x1000)
    try:
        queue = ring.queue(limits=Limits(max_indirect_descriptors=2))
        ring.write_table(TABLES, [(DATA, 4, NEXT, 1), (DATA, 4, NEXT, 2), (DATA, 4, 0, 0)])
        ring.set_desc(0, TABLES, 48, INDIRECT)
        ring.publish(0)
        assert_ring_fatal(queue, "INDIRECT table")
    finally:
        ring.close()


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


def test_rings_outside_guest_ram_are_not_mapped(ram: GuestRam) -> None:
    queue = Virtqueue(0, ram.memory, Limits())
    queue.set_num(NUM)
    queue.set_addr(ram.qva(0), ram.qva(0) + RAM_SIZE - 8, ram.qva(0x100))
    queue.started = queue.enabled = True
    assert not queue.ready


# --- used ring, notifications, EVENT_IDX ---------------------------------------------------


def submit(ring: DriverRing, queue: Virtqueue, count: int) -> None:
    """Make ``count`` one-descriptor chains available, pop and complete them."""
    for _ in range(count):
        ring.set_desc(0, DATA, 4, WRITE)
        ring.publish(0)
        chain = pop_one(queue)
        queue.push(chain.head, 4)


def test_event_idx_publishes_avail_event_when_the_ring_is_empty(ring: DriverRing) -> None:
    """While chains are available the device will look again anyway: the driver is
    asked for a kick only once the device found the ring empty (as vhost does)."""
    queue = ring.queue()
    queue.event_idx = True
    for i in range(3):
        ring.set_desc(i, DATA, 4)
    ring.publish(0, 1, 2)
    pop_one(queue)
    assert ring.avail_event() == 0
    pop_one(queue)
    pop_one(queue)
    assert ring.avail_event() == 0
    assert queue.pop() is None
    assert ring.avail_event() == 3


def test_pop_batch_takes_every_available_chain_in_order(ring: DriverRing) -> None:
    queue = ring.queue()
    queue.event_idx = True
    for i in range(5):
        ring.set_desc(i, DATA + 16 * i, 4)
    ring.publish(3, 1, 4, 0, 2)
    assert [c.head for c in queue.pop_batch(2)] == [3, 1]
    assert [c.head for c in queue.pop_batch()] == [4, 0, 2]
    assert ring.avail_event() == 0
    assert queue.pop_batch() == [] and ring.avail_event() == 5


def test_pop_batch_serves_the_chains_before_a_corrupt_one(ring: DriverRing) -> None:
    """A bad head in the middle of a batch: what came before is returned (and served);
    the next pop raises, and the ring's base stays at the corrupt entry."""
    queue = ring.queue()
    for i in range(2):
        ring.set_desc(i, DATA, 4)
    ring.publish(0, 1, NUM, 0)
    assert [c.head for c in queue.pop_batch()] == [0, 1]
    assert_ring_fatal(queue, "head index")
    assert queue.last_avail == 2


def test_unpop_gives_chains_back(ring: DriverRing) -> None:
    queue = ring.queue()
    for i in range(3):
        ring.set_desc(i, DATA + 16 * i, 4 + i)
    ring.publish(2, 0, 1)
    first = queue.pop_batch()
    queue.unpop(2)
    assert queue.last_avail == 1
    again = queue.pop_batch()
    assert [(c.head, c.out_len) for c in again] == [(c.head, c.out_len) for c in first[1:]]


def test_event_idx_avail_event_on_an_empty_ring(ring: DriverRing) -> None:
    queue = ring.queue()
    queue.event_idx = True
    queue.set_base(5)
    ring.avail_idx = 5
    ring.set_avail_idx(5)
    assert queue.pop() is None
    assert ring.avail_event() == 5


def test_event_idx_notifications_respect_used_event(ring: DriverRing) -> None:
    queue = ring.queue()
    queue.event_idx = True
    ring.set_used_event(0)
    submit(ring, queue, 1)
    queue.notify()
    assert ring.interrupts() == 1  # the first notification always goes out
    ring.set_used_event(5)
    submit(ring, queue, 1)  # used 1 -> 2: no
    queue.notify()
    assert ring.interrupts() == 0
    submit(ring, queue, 3)  # used 2 -> 5: 5 not yet passed
    queue.notify()
    assert ring.interrupts() == 0
    submit(ring, queue, 1)  # used 5 -> 6: passes used_event 5
    queue.notify()
    assert ring.interrupts() == 1
    submit(ring, queue, 1)  # 6 -> 7 with used_event still 5
    queue.notify()
    assert ring.interrupts() == 0
    ring.set_used_event(7)
    submit(ring, queue, 2)  # 7 -> 9 passes 7
    queue.notify()
    assert ring.interrupts() == 1
    assert ring.used_idx() == 9


def test_event_idx_first_notification_after_set_up_always_signals(ring: DriverRing) -> None:
    queue = ring.queue()
    queue.event_idx = True
    ring.set_used_event(100)  # far ahead: vring_need_event alone would stay silent
    submit(ring, queue, 1)
    queue.notify()
    assert ring.interrupts() == 1
    submit(ring, queue, 1)
    queue.notify()
    assert ring.interrupts() == 0
    ring.attach(queue)  # SET_VRING_ADDR again: the next one must go out
    submit(ring, queue, 1)
    queue.notify()
    assert ring.interrupts() == 1


def test_event_idx_ignores_no_interrupt(ring: DriverRing) -> None:
    queue = ring.queue()
    queue.event_idx = True
    ring.set_avail_flags(int(AvailFlag.NO_INTERRUPT))
    ring.set_used_event(0)
    submit(ring, queue, 1)
    queue.notify()
    assert ring.interrupts() == 1


def test_without_event_idx_no_interrupt_suppresses(ring: DriverRing) -> None:
    queue = ring.queue()
    submit(ring, queue, 1)
    queue.notify()
    assert ring.interrupts() == 1
    ring.set_avail_flags(int(AvailFlag.NO_INTERRUPT))
    submit(ring, queue, 1)
    queue.notify()
    assert ring.interrupts() == 0
    ring.set_avail_flags(0)
    queue.notify()
    assert ring.interrupts() == 1


def test_used_ring_wraps(ring: DriverRing) -> None:
    queue = ring.queue()
    submit(ring, queue, 3 * NUM + 1)
    assert ring.used_idx() == 3 * NUM + 1
    assert len(ring.take_used()) == 3 * NUM + 1


def test_used_idx_is_taken_from_memory_on_set_addr(ring: DriverRing) -> None:
    queue = ring.queue()
    submit(ring, queue, 3)
    again = Virtqueue(0, ring.ram.memory, Limits())
    ring.attach(again)
    assert again.used_idx == 3


def test_stop_returns_the_next_avail_index(ring: DriverRing) -> None:
    queue = ring.queue()
    submit(ring, queue, 2)
    assert queue.stop() == 2
    assert not queue.ready


def test_a_broken_queue_is_not_ready_until_set_up_again(ring: DriverRing) -> None:
    queue = ring.queue()
    queue.mark_broken("test")
    assert not queue.ready
    queue.set_base(0)
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
@given(num=st.integers(1, 8), table=st.lists(DESCS, min_size=8, max_size=8),
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


# --- the two-descriptor fast path agrees with the general walk -----------------------


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


@settings(max_examples=400, deadline=None,
          suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(first=FIRST, second=SECOND, indirect=st.booleans(),
       table_at=st.sampled_from([TABLES, RAM_SIZE - 16, OUTSIDE]))
def test_fast_path_agrees_with_the_general_walk(ram: GuestRam, ring: DriverRing,
                                                first: tuple[int, int, int, int],
                                                second: tuple[int, int, int, int],
                                                indirect: bool, table_at: int) -> None:
    queue = ring.queue()
    if indirect:
        if table_at != OUTSIDE:
            ring.write_table(table_at, [first, second][:2 if table_at == TABLES else 1])
        ring.set_desc(0, table_at, 32, INDIRECT)
    else:
        ring.set_desc(0, *first)
        ring.set_desc(first[3] % NUM, *second)
    ram.write(DATA, bytes(range(256)) * 8)
    queue._last_region = None  # both walks start from the same cache state
    general = walked(queue)
    queue._last_region = None
    assert popped(queue, ring) == general
    queue._last_region = queue._memory.regions[0]  # and with the region cached
    fast = popped(queue, ring)
    queue._last_region = queue._memory.regions[0]
    assert fast == walked(queue)
