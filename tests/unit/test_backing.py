"""``Backing.read``, ``read_rows`` and ``write`` against a concatenation model;
``read_mem_entries`` snapshots."""

from __future__ import annotations

import random
import struct
import tracemalloc
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import GuestProtocolError
from tests.unit.driver_ring import DriverRing
from tests.unit.guest_ram import GuestRam
from vgpu_backend.backing import Backing, read_mem_entries

PAGE = 4096
#: two adjacent regions (the second at an odd mmap offset) and one further away
LAYOUT = [(0x100000, 16 * PAGE), (0x110000, 8 * PAGE, 100), (0x200000, 16 * PAGE)]


@pytest.fixture(scope="module")
def ram() -> Iterator[GuestRam]:
    """Guest RAM filled with random bytes (the tests only read it)."""
    ram = GuestRam(LAYOUT)
    rng = random.Random(7)
    for gpa, size, *_ in LAYOUT:
        ram.write(gpa, rng.randbytes(size))
    yield ram
    ram.close()


@st.composite
def entries(draw: st.DrawFn, aligned: bool) -> list[tuple[int, int]]:
    """Guest ranges inside RAM; aligned ones are whole pages or 64-byte multiples."""
    out = []
    unit = draw(st.sampled_from([64, PAGE])) if aligned else 1
    for _ in range(draw(st.integers(1, 8))):
        gpa, size, *_ = draw(st.sampled_from(LAYOUT))
        span = size + (8 * PAGE if gpa == 0x100000 else 0)  # may run into the next region
        start = draw(st.integers(0, span // unit - 1)) * unit
        length = draw(st.integers(1, (span - start) // unit)) * unit
        out.append((gpa + start, length))
    return out


def make_backing(ram: GuestRam, ranges: list[tuple[int, int]], coalesce: bool) -> Backing:
    segs = ram.memory.translate(np.array([a for a, _ in ranges], np.uint64),
                                np.array([n for _, n in ranges], np.uint64))
    return Backing(ram.memory, segs.coalesced() if coalesce else segs)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), aligned=st.booleans(), coalesce=st.booleans())
def test_read_matches_the_concatenation(ram: GuestRam, data: st.DataObject, aligned: bool,
                                        coalesce: bool) -> None:
    ranges = data.draw(entries(aligned))
    model = b"".join(ram.read(a, n) for a, n in ranges)
    backing = make_backing(ram, ranges, coalesce)
    assert backing.size == len(model)
    for _ in range(4):
        start = data.draw(st.integers(0, len(model)))
        size = data.draw(st.integers(0, len(model) - start))
        got = backing.read(start, size)
        assert got.dtype == np.uint8 and got.shape == (size,)
        assert got.tobytes() == model[start:start + size]
    assert backing.read(0, len(model)).tobytes() == model


@settings(max_examples=50, deadline=None)
@given(data=st.data())
def test_reads_beyond_the_backing_are_refused(ram: GuestRam, data: st.DataObject) -> None:
    ranges = data.draw(entries(aligned=False))
    backing = make_backing(ram, ranges, coalesce=True)
    start = data.draw(st.integers(-5, backing.size + 5))
    size = data.draw(st.integers(-5, backing.size + 5))
    if start < 0 or size < 0 or start + size > backing.size:
        with pytest.raises(GuestProtocolError):
            backing.read(start, size)
    else:
        assert backing.read(start, size).shape == (size,)


@settings(max_examples=150, deadline=None)
@given(data=st.data(), aligned=st.booleans(), coalesce=st.booleans())
def test_read_rows_matches_the_concatenation(ram: GuestRam, data: st.DataObject,
                                             aligned: bool, coalesce: bool) -> None:
    ranges = data.draw(entries(aligned))
    model = b"".join(ram.read(a, n) for a, n in ranges)
    backing = make_backing(ram, ranges, coalesce)
    row_bytes = data.draw(st.integers(1, len(model)))
    stride = data.draw(st.integers(row_bytes, len(model)))
    rows = data.draw(st.integers(1, (len(model) - row_bytes) // stride + 1))
    start = data.draw(st.integers(0, len(model) - (rows - 1) * stride - row_bytes))
    got = backing.read_rows(start, stride, row_bytes, rows)
    assert got.shape == (rows, row_bytes)
    assert [got[i].tobytes() for i in range(rows)] == \
        [model[start + i * stride:start + i * stride + row_bytes] for i in range(rows)]
    with pytest.raises(GuestProtocolError):
        backing.read_rows(start + 1, stride, row_bytes, rows + 1 + len(model) // stride)


def test_read_rows_copies_the_rows_not_the_gaps(ram: GuestRam) -> None:
    """A guest-chosen stride over a backing whose entries repeat the same pages spans
    gigabytes: only the rows' bytes may be copied."""
    pages = [(0x100000, 16 * PAGE), (0x200000, 16 * PAGE)] * 32768  # 4 GiB of backing
    backing = make_backing(ram, pages, coalesce=False)
    stride = 1 << 30
    tracemalloc.start()
    try:
        rows = backing.read_rows(3, stride, 4, 4)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak < 8 << 20  # the pieces' index arrays, not 3 GiB of gaps
    assert [rows[i].tobytes() for i in range(4)] == \
        [ram.read((0x100000 if (i * stride // (16 * PAGE)) % 2 == 0 else 0x200000)
                  + (3 + i * stride) % (16 * PAGE), 4) for i in range(4)]


def test_large_pieces_are_copied_without_index_arrays(ram: GuestRam) -> None:
    """Pieces of many 64-byte units (64 KiB + 64 bytes each) are copied one by one: no
    index entry per unit (8 bytes per 64 copied, in several arrays)."""
    runs = [(0x100000, 16 * PAGE + 64), (0x200000, 16 * PAGE - 64)] * 64  # 8 MiB
    backing = make_backing(ram, runs, coalesce=False)
    tracemalloc.start()
    try:
        got = backing.read(64, backing.size - 128)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert peak - got.nbytes < 256 << 10
    model = b"".join(ram.read(a, n) for a, n in runs)
    assert got.tobytes() == model[64:-64]


@pytest.mark.parametrize("shift", [8, 100, 4095])
def test_aligned_lengths_at_unaligned_guest_offsets(ram: GuestRam, shift: int) -> None:
    """Pieces whose lengths (and places in the buffer) are 64-byte multiples but whose
    guest addresses are not: the gather's row size must divide the guest offsets too."""
    runs = [(0x100000 + shift + k * PAGE, 128) for k in range(6)] + [(0x200000 + shift, 64)]
    backing = make_backing(ram, runs, coalesce=False)
    model = b"".join(ram.read(a, n) for a, n in runs)
    assert backing.read(0, len(model)).tobytes() == model
    assert backing.read(64, 256).tobytes() == model[64:320]


def test_contiguous_reads_are_views_of_guest_memory(ram: GuestRam) -> None:
    backing = make_backing(ram, [(0x200000, PAGE)], coalesce=True)
    view = backing.read(16, 32)
    ram.write(0x200010, b"\xAB" * 32)
    assert view.tobytes() == b"\xAB" * 32  # no copy was made


def test_regions_used(ram: GuestRam) -> None:
    backing = make_backing(ram, [(0x10F000, 2 * PAGE), (0x200000, PAGE)], coalesce=True)
    ids = {r.id for r in ram.memory.regions}
    assert backing.region_ids == ids
    assert all(backing.uses_region(i) for i in ids)
    assert not backing.uses_region(max(ids) + 1)
    one = make_backing(ram, [(0x200000 + 64, 128)], coalesce=True)  # a single segment
    assert len(one.segments) == 1 and len(one.region_ids) == 1
    assert one.uses_region(next(iter(one.region_ids)))


def test_read_rows_refuses_bad_shapes(ram: GuestRam) -> None:
    """No rows, empty rows or rows overlapping (stride < row_bytes) are caller bugs."""
    backing = make_backing(ram, [(0x200000, PAGE)], coalesce=True)
    for rows, row_bytes, stride in [(0, 4, 4), (-1, 4, 8), (2, 0, 4), (2, 8, 4)]:
        with pytest.raises(ValueError):
            backing.read_rows(0, stride, row_bytes, rows)


def test_negative_starts_are_refused(ram: GuestRam) -> None:
    """A range starting before the backing is refused even when it ends inside it."""
    backing = make_backing(ram, [(0x100000, 100), (0x200000, 100)], coalesce=False)
    with pytest.raises(GuestProtocolError):
        backing.read(-1, 10)
    with pytest.raises(GuestProtocolError):
        backing.read_rows(-4, 8, 4, 2)
    with pytest.raises(GuestProtocolError):
        backing.read_into(-1, np.zeros(10, np.uint8))


def test_reads_inside_one_segment_at_its_edges_are_views(ram: GuestRam) -> None:
    """A range that starts where a segment starts or ends where it ends, or rows whose
    span lies in one segment, is still a view of guest memory, not a copy."""
    backing = make_backing(ram, [(0x100000, PAGE), (0x200000, PAGE)], coalesce=False)
    for view in (backing.read(PAGE, 64), backing.read(PAGE - 64, 64),
                 backing.read(0, PAGE), backing.read_rows(PAGE, 128, 64, 4)):
        assert not view.flags.owndata and view.base is not None
    rows = backing.read_rows(PAGE, 128, 64, 4)
    ram.write(0x200080, b"\xCD" * 64)
    try:
        assert rows[1].tobytes() == b"\xCD" * 64  # no copy was made
    finally:
        ram.write(0x200080, bytes(64))


@pytest.mark.parametrize("runs, start, size", [
    ([(0x200000, PAGE)], 16, 32),  # one segment: stored through a view
    ([(0x100000 + 3, 100), (0x200000 + 5, 200)], 50, 200),  # unaligned: piece by piece
    ([(0x100000, 128), (0x100000 + 2 * PAGE, 128)], 0, 256),  # index rows, one region
    ([(0x100000, 128), (0x200000, 128), (0x100000 + PAGE, 128)], 64, 320),  # two regions
], ids=["view", "looped", "one region", "two regions"])
def test_write_stores_into_the_right_guest_bytes(runs: list[tuple[int, int]], start: int,
                                                 size: int) -> None:
    """``write`` puts each byte where ``read`` takes it from, and touches nothing else,
    on each of the copy paths."""
    wram = GuestRam(LAYOUT)
    try:
        rng = random.Random(size)
        for gpa, length, *_ in LAYOUT:
            wram.write(gpa, rng.randbytes(length))
        expected = {gpa: bytearray(wram.read(gpa, length)) for gpa, length, *_ in LAYOUT}
        backing = make_backing(wram, runs, coalesce=False)
        data = rng.randbytes(size)
        backing.write(start, np.frombuffer(data, np.uint8))
        done = 0
        for a, n in runs:  # the model: the written bytes land run by run, in order
            for i in range(n):
                if start <= done + i < start + size:
                    base = 0x100000 if a < 0x200000 else 0x200000  # runs stay in a region
                    expected[base][a - base + i] = data[done + i - start]
            done += n
        for gpa, length, *_ in LAYOUT:
            assert wram.read(gpa, length) == bytes(expected[gpa]), hex(gpa)
        assert backing.read(start, size).tobytes() == data
        with pytest.raises(GuestProtocolError):
            backing.write(backing.size - 1, np.zeros(2, np.uint8))
    finally:
        wram.close()


# --- read_mem_entries --------------------------------------------------------------


@pytest.fixture
def ring_and_queue() -> Iterator[tuple[DriverRing, GuestRam]]:
    ram = GuestRam([(0, 1 << 20)])
    ring = DriverRing(ram, 8, 0)
    yield ring, ram
    ring.close()
    ram.close()


def test_read_mem_entries_checks_count_and_bytes_and_snapshots(
        ring_and_queue: tuple[DriverRing, GuestRam]) -> None:
    ring, ram = ring_and_queue
    queue = ring.queue()
    payload = b"H" * 32 + b"".join(struct.pack("<QII", 0x1000 * i, 100 + i, 0)
                                   for i in range(4))
    ram.write(0x8000, payload[:40])  # split over two descriptors at an odd boundary
    ram.write(0x9000, payload[40:])
    ring.set_desc(0, 0x8000, 40, 1, 1)
    ring.set_desc(1, 0x9000, len(payload) - 40, 0, 0)
    ring.publish(0)
    chain = queue.pop()
    assert chain is not None
    addr, length = read_mem_entries(chain, 32, 4, limit=4)
    assert addr.tolist() == [0, 0x1000, 0x2000, 0x3000]
    assert length.tolist() == [100, 101, 102, 103] and length.dtype == np.uint64
    assert addr.flags.c_contiguous and length.flags.c_contiguous  # columns
    ram.write(0x9000, b"\xFF" * 8)  # the guest changes its mind afterwards
    assert addr.tolist()[1] == 0x1000
    with pytest.raises(GuestProtocolError, match="limit"):
        read_mem_entries(chain, 32, 5, limit=4)
    with pytest.raises(GuestProtocolError, match="need"):
        read_mem_entries(chain, 32, 5, limit=100)
    with pytest.raises(GuestProtocolError):
        read_mem_entries(chain, 32, 1 << 31, limit=1 << 32)


@pytest.mark.parametrize("split", [None, 16, 48], ids=["one buffer", "split 16", "split 48"])
def test_read_mem_entries_from_entry_aligned_buffers(
        ring_and_queue: tuple[DriverRing, GuestRam], split: int | None) -> None:
    """Entries that start a descriptor buffer (as the Linux driver sends them) are
    copied straight into their columns; each buffer is one snapshot."""
    ring, ram = ring_and_queue
    queue = ring.queue()
    table = b"".join(struct.pack("<QII", 0x2000 * i + 7, 4096 * (i + 1), 0xDEAD)
                     for i in range(6))
    if split is None:
        ram.write(0x8000, table)
        ring.set_desc(0, 0x8000, len(table), 0, 0)
    else:
        ram.write(0x8000, table[:split])
        ram.write(0xA000, table[split:])
        ring.set_desc(0, 0x8000, split, 1, 1)
        ring.set_desc(1, 0xA000, len(table) - split, 0, 0)
    ring.publish(0)
    chain = queue.pop()
    assert chain is not None
    addr, length = read_mem_entries(chain, 0, 6, limit=6)
    assert addr.tolist() == [0x2000 * i + 7 for i in range(6)]
    assert length.tolist() == [4096 * (i + 1) for i in range(6)]  # padding dropped
    assert addr.dtype == length.dtype == np.uint64
    assert addr.flags.c_contiguous and length.flags.c_contiguous
    ram.write(0x8000, b"\xFF" * 16)
    assert addr[0] == 7
    tail, _ = read_mem_entries(chain, 32, 4, limit=6)
    assert tail.tolist() == [0x2000 * i + 7 for i in range(2, 6)]
