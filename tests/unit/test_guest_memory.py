"""``GuestMemory`` against simple per-entry models; region bookkeeping."""

from __future__ import annotations

import os
from collections.abc import Iterator
from unittest import mock

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from protocol.errors import FrontendProtocolError, GuestProtocolError
from protocol.vhost_user import MemRegion
from tests.unit.guest_ram import GuestRam
from vgpu_backend import guest_memory
from vgpu_backend.guest_memory import GuestMemory, MemoryRegion, Segments

PAGE = 4096
TOP = 1 << 64
Segment = tuple[int, int, int]  # region id, offset, length


# --- the reference model -------------------------------------------------------------


def model_translate(regions: tuple[MemoryRegion, ...], addr: int, length: int) -> list[Segment]:
    """Translate one range byte-walk style; ``ValueError`` where the guest is wrong."""
    if length == 0 or addr + length > TOP:
        raise ValueError("empty or wrapping")
    out, cur, end = [], addr, addr + length
    while cur < end:
        region = next((r for r in regions if r.gpa <= cur < r.gpa + r.size), None)
        if region is None:
            raise ValueError("not RAM")
        piece = min(end, region.gpa + region.size) - cur
        out.append((region.id, cur - region.gpa, piece))
        cur += piece
    return out


def segments_list(segs: Segments) -> list[Segment]:
    return list(zip(segs.region_id.tolist(), segs.offset.tolist(), segs.length.tolist(),
                    strict=True))


def check_against_model(memory: GuestMemory, ranges: list[tuple[int, int]]) -> None:
    addr = np.array([a for a, _ in ranges], dtype=np.uint64)
    length = np.array([n for _, n in ranges], dtype=np.uint64)
    try:
        expected: list[Segment] | None = [
            seg for a, n in ranges for seg in model_translate(memory.regions, a, n)]
    except ValueError:
        expected = None
    if expected is None:
        with pytest.raises(GuestProtocolError):
            memory.translate(addr, length)
    else:
        got = memory.translate(addr, length)
        assert segments_list(got) == expected
        assert got.region_id.dtype == np.int64 and got.offset.dtype == np.uint64
        assert got.total == sum(n for _, n in ranges)


# --- strategies ------------------------------------------------------------------------


@st.composite
def ram_layouts(draw: st.DrawFn, max_regions: int = 4) -> list[tuple[int, int, int]]:
    """1..4 regions, adjacent or not, in a random add order, somewhere in 2^64."""
    base = draw(st.sampled_from([0, 0x1_0000_0000, TOP - (1 << 20)]))
    count = draw(st.integers(1, max_regions))
    layout, gpa = [], base
    for _ in range(count):
        gpa += PAGE * draw(st.sampled_from([0, 0, 1, 3]))  # gap before it
        size = PAGE * draw(st.integers(1, 3))
        layout.append((gpa, size, draw(st.sampled_from([0, 100, PAGE]))))
        gpa += size
    return draw(st.permutations(layout))


@st.composite
def ranges_in(draw: st.DrawFn, layout: list[tuple[int, int, int]]) -> list[tuple[int, int]]:
    """Ranges near and across the regions, plus wild and wrapping ones."""
    out = []
    for _ in range(draw(st.integers(0, 6))):
        gpa, size, _ = draw(st.sampled_from(layout))
        kind = draw(st.sampled_from(["inside", "inside", "edge", "wild", "wrap"]))
        if kind == "inside":
            addr = gpa + draw(st.integers(0, size - 1))
            length = draw(st.integers(1, gpa + size - addr))
        elif kind == "edge":
            addr = gpa + draw(st.integers(-64, size + 64))
            length = draw(st.integers(0, 4 * size))
        elif kind == "wild":
            addr, length = draw(st.integers(0, TOP - 1)), draw(st.integers(0, 1 << 20))
        else:
            addr = draw(st.integers(TOP - (1 << 21), TOP - 1))
            length = draw(st.integers(TOP - addr, TOP - 1))
        if addr < 0 or addr >= TOP:
            continue
        out.append((addr, min(length, TOP - 1)))
    return out


@pytest.fixture
def two_adjacent_and_one_apart() -> Iterator[GuestRam]:
    ram = GuestRam([(0x10000, PAGE), (0x11000, 2 * PAGE, 100), (0x20000, PAGE)])
    yield ram
    ram.close()


# --- translate -------------------------------------------------------------------------


#: how regions are located: the bucket table, or comparisons (tables too big or off)
LOOKUPS = {"bucket table": guest_memory._MAX_BUCKETS, "comparisons": 0}


@pytest.mark.parametrize("lookup", LOOKUPS)
@settings(max_examples=200, deadline=None)
@given(data=st.data())
def test_translate_matches_the_model(lookup: str, data: st.DataObject) -> None:
    layout = data.draw(ram_layouts())
    with mock.patch.object(guest_memory, "_MAX_BUCKETS", LOOKUPS[lookup]):
        ram = GuestRam(layout)
    try:
        ranges = data.draw(ranges_in(layout))
        check_against_model(ram.memory, ranges)
        for one in ranges:  # and entry by entry
            check_against_model(ram.memory, [one])
    finally:
        ram.close()


@pytest.mark.parametrize("lookup", LOOKUPS)
@settings(max_examples=30, deadline=None)
@given(data=st.data())
def test_translate_with_many_regions_matches_the_model(lookup: str,
                                                       data: st.DataObject) -> None:
    gaps = data.draw(st.lists(st.sampled_from([0, 1]), min_size=20, max_size=20))
    layout, gpa = [], 0x100000
    for gap in gaps:
        gpa += gap * PAGE
        layout.append((gpa, PAGE, 0))
        gpa += PAGE
    with mock.patch.object(guest_memory, "_MAX_BUCKETS", LOOKUPS[lookup]):
        ram = GuestRam(layout)
    try:
        check_against_model(ram.memory, data.draw(ranges_in(layout)))
    finally:
        ram.close()


@pytest.mark.parametrize("lookup", LOOKUPS)
def test_qemu_like_ram_split_around_the_pci_hole(lookup: str) -> None:
    """RAM below 3 GiB and above 4 GiB (sparse memfds): coarse boundaries, the
    layout the bucket table is for; ranges at every boundary."""
    gib = 1 << 30
    with mock.patch.object(guest_memory, "_MAX_BUCKETS", LOOKUPS[lookup]):
        ram = GuestRam([(0, 3 * gib), (4 * gib, 2 * gib)])
    try:
        check_against_model(ram.memory, [(0, PAGE), (3 * gib - PAGE, PAGE),
                                         (4 * gib, 2 * PAGE), (6 * gib - PAGE, PAGE)])
        for bad in [(3 * gib - PAGE, 2 * PAGE), (3 * gib, PAGE), (4 * gib - 1, 2),
                    (6 * gib - PAGE, PAGE + 1), (1 << 40, PAGE), (TOP - PAGE, PAGE)]:
            check_against_model(ram.memory, [(0, PAGE), bad])
    finally:
        ram.close()


def test_translate_splits_across_adjacent_regions(
        two_adjacent_and_one_apart: GuestRam) -> None:
    memory = two_adjacent_and_one_apart.memory
    first, second, third = memory.regions
    segs = memory.translate(np.array([0x10F00, 0x20010], dtype=np.uint64),
                            np.array([0x200, 0x10], dtype=np.uint64))
    assert segments_list(segs) == [(first.id, 0xF00, 0x100), (second.id, 0, 0x100),
                                   (third.id, 0x10, 0x10)]


@pytest.mark.parametrize("addr, length", [
    (0x12F00, 0x200),      # runs from the second region into the gap
    (0x0FFFF, 2),          # starts below RAM
    (0x10000, 0),          # zero length
    (TOP - 0x10, 0x20),    # wraps 2^64
    (0x10000, 0x10000),    # crosses the gap to the third region
])
def test_translate_refuses_bad_ranges(two_adjacent_and_one_apart: GuestRam, addr: int,
                                      length: int) -> None:
    with pytest.raises(GuestProtocolError):
        two_adjacent_and_one_apart.memory.translate(np.array([addr], dtype=np.uint64),
                                                    np.array([length], dtype=np.uint64))


def test_translate_without_memory_and_without_entries() -> None:
    memory = GuestMemory()
    assert len(memory.translate(np.zeros(0, np.uint64), np.zeros(0, np.uint64))) == 0
    with pytest.raises(GuestProtocolError):
        memory.translate(np.array([0], np.uint64), np.array([1], np.uint64))


def test_a_region_ending_at_the_top_of_the_address_space() -> None:
    try:
        ram = GuestRam([(TOP - PAGE, PAGE)])
    except FrontendProtocolError:
        return  # refusing it is fine too
    try:
        segs = ram.memory.translate(np.array([TOP - 16], np.uint64), np.array([16], np.uint64))
        assert segments_list(segs) == [(ram.memory.regions[0].id, PAGE - 16, 16)]
    finally:
        ram.close()


# --- Segments.coalesced ----------------------------------------------------------------


def model_coalesce(segs: list[Segment]) -> list[Segment]:
    out: list[Segment] = []
    for rid, off, n in segs:
        if out and out[-1][0] == rid and out[-1][1] + out[-1][2] == off:
            out[-1] = (rid, out[-1][1], out[-1][2] + n)
        else:
            out.append((rid, off, n))
    return out


@st.composite
def segment_lists(draw: st.DrawFn) -> list[Segment]:
    out: list[Segment] = []
    for _ in range(draw(st.integers(0, 12))):
        rid = draw(st.sampled_from([1, 2]))
        length = draw(st.integers(1, 64))
        contiguous = draw(st.booleans())
        if out and contiguous:
            prev = out[-1]
            offset = prev[1] + prev[2]  # contiguous with the previous piece
        else:
            offset = draw(st.integers(0, 256))
        out.append((rid, offset, length))
    return out


@settings(max_examples=300, deadline=None)
@given(segs=segment_lists())
def test_coalesced_matches_the_model(segs: list[Segment]) -> None:
    arrays = Segments(np.array([s[0] for s in segs], dtype=np.int64),
                      np.array([s[1] for s in segs], dtype=np.uint64),
                      np.array([s[2] for s in segs], dtype=np.uint64))
    merged = arrays.coalesced()
    assert segments_list(merged) == model_coalesce(segs)
    assert merged.total == arrays.total == sum(s[2] for s in segs)
    assert merged.length.dtype == np.uint64


# --- region bookkeeping ----------------------------------------------------------------


def memfd(size: int) -> int:
    fd = os.memfd_create("vgpu-test", os.MFD_CLOEXEC)
    os.ftruncate(fd, size)
    return fd


def fd_is_open(fd: int) -> bool:
    try:
        os.fstat(fd)
    except OSError:
        return False
    return True


@pytest.mark.parametrize("desc, reason", [
    (MemRegion(0x10800, PAGE, 0x9000_0000, 0), "overlaps"),
    (MemRegion(0x0F800, 2 * PAGE, 0x9000_0000, 0), "overlaps"),  # starts below one
    (MemRegion(0x30000, 0, 0x9000_0000, 0), "size 0"),
    (MemRegion(TOP - PAGE, 2 * PAGE, 0x9000_0000, 0), "wraps"),
])
def test_bad_regions_are_refused_and_their_fd_closed(
        two_adjacent_and_one_apart: GuestRam, desc: MemRegion, reason: str) -> None:
    fd = memfd(PAGE)
    with pytest.raises(FrontendProtocolError, match=reason):
        two_adjacent_and_one_apart.memory.add(desc, fd, max_regions=32)
    assert not fd_is_open(fd)
    assert len(two_adjacent_and_one_apart.memory.regions) == 3


def test_region_count_limit(two_adjacent_and_one_apart: GuestRam) -> None:
    fd = memfd(PAGE)
    with pytest.raises(FrontendProtocolError, match="more than 3"):
        two_adjacent_and_one_apart.memory.add(MemRegion(0x40000, PAGE, 0, 0), fd, 3)
    assert not fd_is_open(fd)


def test_remove_matches_gpa_uaddr_and_size_and_notifies(
        two_adjacent_and_one_apart: GuestRam) -> None:
    memory = two_adjacent_and_one_apart.memory
    second = memory.regions[1]
    unmapped: list[int] = []
    memory.add_unmap_listener(lambda region: unmapped.append(region.id))
    wrong_size = MemRegion(second.gpa, second.size + PAGE, second.uaddr, 0)
    assert not memory.remove(wrong_size)
    fd = second.fd
    assert memory.remove(MemRegion(second.gpa, second.size, second.uaddr, 12345))
    assert unmapped == [second.id]
    assert not fd_is_open(fd)
    with pytest.raises(KeyError):
        memory.region(second.id)
    # the hole now splits what used to be contiguous
    with pytest.raises(GuestProtocolError):
        memory.translate(np.array([0x10F00], np.uint64), np.array([0x200], np.uint64))


def test_qva_and_gpa_lookups(two_adjacent_and_one_apart: GuestRam) -> None:
    ram = two_adjacent_and_one_apart
    second = ram.memory.regions[1]
    region, offset = ram.memory.qva_to_region(ram.qva(0x11010), 16)
    assert (region.id, offset) == (second.id, 0x10)
    region, offset = ram.memory.gpa_to_region(0x11010, 16)
    assert (region.id, offset) == (second.id, 0x10)
    with pytest.raises(GuestProtocolError) as info:
        ram.memory.qva_to_region(ram.qva(0x10F00), 0x200)  # two mappings
    assert info.value.ring_fatal
    with pytest.raises(GuestProtocolError):
        ram.memory.gpa_to_region(0x10F00, 0x200)  # crosses regions


def test_region_array_sees_the_guest_bytes_at_mmap_offset(
        two_adjacent_and_one_apart: GuestRam) -> None:
    ram = two_adjacent_and_one_apart
    ram.write(0x11000, b"hello")
    second = ram.memory.regions[1]
    assert second.mmap_offset == 100
    assert second.array[:5].tobytes() == b"hello"
    assert second.array.shape == (second.size,)
    bases = ram.memory.host_base(np.array([second.id, second.id], np.int64))
    assert bases.tolist() == [second.host_addr] * 2
    fds, offsets = ram.memory.file_base(np.array([second.id], np.int64))
    assert (fds.tolist(), offsets.tolist()) == ([second.fd], [100])


@pytest.mark.parametrize("lookup", LOOKUPS)
@pytest.mark.parametrize("layout", [[(0x10000, 4 * PAGE)],
                                    [(0x10000, PAGE), (0x11000, 2 * PAGE, 100),
                                     (0x20000, PAGE)]], ids=["one region", "three"])
def test_ranges_may_end_at_a_region_end_and_not_a_byte_beyond(
        lookup: str, layout: list[tuple[int, ...]]) -> None:
    """The last bytes of each region translate and look up; one more byte does not
    (a single region has its own fast path)."""
    with mock.patch.object(guest_memory, "_MAX_BUCKETS", LOOKUPS[lookup]):
        ram = GuestRam(layout)
    try:
        memory = ram.memory
        for region in memory.regions:
            last = region.gpa_end - 16
            assert segments_list(memory.translate(np.array([last], np.uint64),
                                                  np.array([16], np.uint64))) == [
                (region.id, region.size - 16, 16)]
            assert memory.gpa_to_region(last, 16) == (region, region.size - 16)
            assert memory.qva_to_region(region.uaddr + region.size - 16, 16) == (
                region, region.size - 16)
            assert memory.gpa_to_region(region.gpa, region.size) == (region, 0)
        top = memory.regions[-1]
        with pytest.raises(GuestProtocolError):
            memory.translate(np.array([top.gpa_end - 16], np.uint64),
                             np.array([17], np.uint64))
        with pytest.raises(GuestProtocolError):
            memory.gpa_to_region(top.gpa_end - 16, 17)
        with pytest.raises(GuestProtocolError):
            memory.gpa_to_region(top.gpa - 1, 2)
        with pytest.raises(GuestProtocolError):
            memory.qva_to_region(top.uaddr + top.size - 16, 17)
        with pytest.raises(GuestProtocolError):
            memory.qva_to_region(top.uaddr - 1, 2)
    finally:
        ram.close()


@pytest.mark.parametrize("desc, ok", [
    (MemRegion(TOP - 1 - PAGE, PAGE, 0x9000_0000, 0), True),
    (MemRegion(0x9000_0000, PAGE, TOP - 1 - PAGE, 0), True),
    (MemRegion(TOP - PAGE, PAGE, 0x9000_0000, 0), False),
    (MemRegion(0x9000_0000, PAGE, TOP - PAGE, 0), False),
])
def test_region_bounds_reach_the_last_u64_but_never_wrap(desc: MemRegion, ok: bool) -> None:
    """A region may end at 2^64-1 (its end still fits a u64), in guest and in QEMU
    addresses; one byte further is refused."""
    memory = GuestMemory()
    try:
        if ok:
            assert memory.add(desc, memfd(PAGE), max_regions=4).size == PAGE
        else:
            with pytest.raises(FrontendProtocolError, match="wraps"):
                memory.add(desc, memfd(PAGE), max_regions=4)
    finally:
        memory.clear()


def test_a_table_with_the_same_addresses_from_another_file_remaps(
        two_adjacent_and_one_apart: GuestRam) -> None:
    """SET_MEM_TABLE keeps a region only if it is the same file too: the same addresses
    backed by a new memfd are unmapped (listeners told) and mapped anew."""
    memory = two_adjacent_and_one_apart.memory
    old = memory.regions
    two_adjacent_and_one_apart.write(0x10000, b"old bytes")
    fresh = memfd(PAGE)
    os.pwrite(fresh, b"new bytes", 0)
    kept = [os.dup(region.fd) for region in old[1:]]
    unmapped: list[int] = []
    memory.add_unmap_listener(lambda region: unmapped.append(region.id))
    descs = [MemRegion(r.gpa, r.size, r.uaddr, r.mmap_offset) for r in old]
    memory.replace_all(descs, [fresh, *kept], max_regions=32)
    assert unmapped == [old[0].id]
    new = memory.regions
    assert new[0].id != old[0].id and [r.id for r in new[1:]] == [r.id for r in old[1:]]
    assert new[0].array[:9].tobytes() == b"new bytes"
    assert not fd_is_open(old[0].fd) and old[0].fd == -1


def test_a_refused_region_in_a_table_closes_every_fd_once() -> None:
    """SET_MEM_TABLE with a bad region in the middle: the regions before it are mapped,
    its fd and those of the regions after it are closed, each exactly once."""
    memory = GuestMemory()
    fds = [memfd(PAGE) for _ in range(4)]
    descs = [MemRegion(0, PAGE, 0x9000_0000, 0), MemRegion(PAGE, 0, 0xA000_0000, 0),
             MemRegion(2 * PAGE, PAGE, 0xB000_0000, 0), MemRegion(3 * PAGE, PAGE, 0xC000_0000, 0)]
    closed: list[int] = []
    real_close = os.close

    def counting_close(fd: int) -> None:
        closed.append(fd)
        real_close(fd)
    try:
        with mock.patch("os.close", counting_close), \
                pytest.raises(FrontendProtocolError, match="size 0"):
            memory.replace_all(descs, fds, max_regions=32)
        assert [r.gpa for r in memory.regions] == [0]
        assert sorted(closed) == sorted(fds[1:])
        assert fd_is_open(fds[0]) and not any(fd_is_open(fd) for fd in fds[1:])
    finally:
        memory.clear()
