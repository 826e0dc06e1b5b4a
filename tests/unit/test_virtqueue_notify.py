"""Batches and the used ring: pop_batch and unpop, notifications (EVENT_IDX's
avail_event and used_event, NO_INTERRUPT), index wrap-around, and what a stopped ring
reports."""

from __future__ import annotations

import pytest

from protocol.limits import Limits
from protocol.virtqueue import AvailFlag, DescFlag
from tests.unit.driver_ring import NUM, DriverRing, assert_ring_fatal, pop_one
from tests.unit.guest_ram import GuestRam
from vgpu_backend.virtqueue import Virtqueue

NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)
DATA = 0x10000       # buffers
TABLES = 0x80000     # INDIRECT tables


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
    assert not queue.pop_batch() and ring.avail_event() == 5


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
    assert [(c.head, c.out_len) for c in again] == [(c.head, c.out_len) for c in list(first)[1:]]


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


#: chain kinds at avail indices 0xFFFE, 0xFFFF, 0, 1 (the first caches the region, so
#: later INDIRECT pairs take the fast path)
WRAP_KINDS = {"INDIRECT pair crosses": ("indirect", "indirect", "direct", "direct"),
              "direct pair crosses": ("indirect", "direct", "indirect", "indirect")}


@pytest.mark.parametrize("kinds", list(WRAP_KINDS.values()), ids=list(WRAP_KINDS))
def test_avail_and_used_indices_wrap_past_0xffff(ram: GuestRam, ring: DriverRing,
                                                 kinds: tuple[str, ...]) -> None:
    """Indices are 16 bits: pops, unpop, used entries and the base given back at stop
    all wrap from 0xFFFF to 0."""
    ram.write(ring.used_gpa + 2, b"\xfe\xff")  # used.idx 0xFFFE, read at SET_VRING_ADDR
    queue = ring.queue()
    queue.set_base(0xFFFE)
    ring.avail_idx = ring.seen_used = 0xFFFE
    for i, kind in enumerate(kinds):
        cmd, resp = DATA + 0x100 * i, DATA + 0x100 * i + 0x80
        if kind == "indirect":
            ring.write_table(TABLES + 32 * i, [(cmd, 8, NEXT, 1), (resp, 8, WRITE, 0)])
            ring.set_desc(i, TABLES + 32 * i, 32, INDIRECT)
        else:
            ring.set_desc(i, cmd, 8, NEXT, 4 + i)
            ring.set_desc(4 + i, resp, 8, WRITE)
    ring.publish(0, 1, 2, 3)
    assert queue.pending() == 4

    def pop_heads(count: int) -> list[int]:
        heads = []
        for _ in range(count):
            heads.append(pop_one(queue).head)
            assert 0 <= queue.last_avail <= 0xFFFF
        return heads

    assert pop_heads(4) == [0, 1, 2, 3] and queue.last_avail == 2
    queue.unpop(3)
    assert queue.last_avail == 0xFFFF and queue.pending() == 3
    assert pop_heads(3) == [1, 2, 3] and queue.pop() is None
    for head in range(4):
        queue.push(head, 8)
    assert ring.used_idx() == 2 and queue.used_idx == 2
    assert ring.take_used() == [(head, 8) for head in range(4)]
    assert queue.stop() == 2


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


