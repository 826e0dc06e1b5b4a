"""The ring indices a driver polls while the device runs are stored whole: a driver
on another CPU never sees a half-written ``used.idx`` or ``avail_event``.

A guest polling ``used.idx`` once saw it go from 3 to 0: ``struct.pack_into`` zeroes
its target before it writes the value.  Here a forked process plays the other CPU,
loading one 16-bit word a million times per numpy call through a stride-0 view,
while this process runs the real :class:`Virtqueue` over the same memfd.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import numpy as np
import numpy.typing as npt
from numpy.lib.stride_tricks import as_strided

from tests.unit.driver_ring import DriverRing
from tests.unit.guest_ram import GuestRam

#: every value the device stores in these tests has a non-zero high byte
FLOOR = 0x100
#: loads per numpy call in the other process
BURST = 1_000_000
#: where the other process is told to stop (outside the ring)
STOP_AT = 0x80000
U16 = npt.NDArray[np.uint16]


def _word(ram: GuestRam, gpa: int) -> U16:
    region = ram.regions[0]
    words = np.frombuffer(region.mapping, dtype="<u2")
    return words[(region.mmap_offset + gpa - region.gpa) // 2:][:1]


@contextlib.contextmanager
def _other_cpu(ram: GuestRam, gpa: int) -> Iterator[list[int]]:
    """A child loads the 16-bit word at ``gpa`` over and over until the block ends;
    the yielded list then holds the lowest value of each burst of loads."""
    stop = _word(ram, STOP_AT)
    stop[0] = 0
    ready_r, ready_w = os.pipe()
    out_r, out_w = os.pipe()
    pid = os.fork()
    if pid == 0:  # pragma: no cover - the child
        code = 0
        try:
            os.close(ready_r)
            os.close(out_r)
            word = as_strided(_word(ram, gpa), shape=(BURST,), strides=(0,))
            lows = [int(word.min())]
            os.write(ready_w, b"r")
            while not stop[0]:
                lows.append(int(word.min()))
            os.write(out_w, np.array(lows, dtype=np.int64).tobytes())
        except BaseException:
            code = 1
        finally:
            os._exit(code)
    os.close(ready_w)
    os.close(out_w)
    results: list[int] = []
    try:
        assert os.read(ready_r, 1) == b"r"
        yield results
    finally:
        stop[0] = 1
        del stop  # no view may outlive the test's RAM
        data = b""
        while chunk := os.read(out_r, 1 << 16):
            data += chunk
        os.close(ready_r)
        os.close(out_r)
        _, status = os.waitpid(pid, 0)
        assert os.waitstatus_to_exitcode(status) == 0
        results.extend(np.frombuffer(data, dtype=np.int64).tolist())


def test_used_index_is_stored_whole(ring: DriverRing) -> None:
    queue = ring.queue()
    _word(ring.ram, ring.used_gpa + 2)[0] = FLOOR
    with _other_cpu(ring.ram, ring.used_gpa + 2) as lowest:
        for _ in range(4):
            queue.used_idx = FLOOR - 1
            for _ in range(FLOOR, 0xFFFF):
                queue.push(0, 0)
    assert min(lowest) >= FLOOR, "the driver saw a half-written used.idx"


def test_avail_event_is_stored_whole(ring: DriverRing) -> None:
    queue = ring.queue()
    queue.event_idx = True
    avail_event_at = ring.used_gpa + 4 + 8 * ring.num
    _word(ring.ram, avail_event_at)[0] = FLOOR
    with _other_cpu(ring.ram, avail_event_at) as lowest:
        for _ in range(2):
            for index in range(FLOOR, 0xFFFF):
                ring.set_avail_idx(index)
                queue.last_avail = index
                assert not queue.pop_batch()  # the ring is empty: avail_event published
    assert min(lowest) >= FLOOR, "the driver saw a half-written avail_event"
