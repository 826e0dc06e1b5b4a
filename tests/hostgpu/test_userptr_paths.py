"""Each userptr path end to end over the simulated KFD, on real guest RAM (a memfd):
the GPU sees the memfd's pages in buffer order, with zero copies."""

from __future__ import annotations

import dataclasses
import errno
import itertools
import os
from collections.abc import Iterator

import numpy as np
import pytest

from protocol.limits import DEFAULT_LIMITS
from vgpu_backend.hostgpu import hostmem
from vgpu_backend.hostgpu import kfd_abi as abi
from vgpu_backend.hostgpu.base import GpuFault, HostGpuError, HostRanges, UserptrPath
from vgpu_backend.hostgpu.sim_config import SimKfdConfig
from vgpu_backend.hostgpu.userptr_paths import _reserve_aligned, alias_refusal, coalesce_host

from .helpers import PAGE, GuestRam, MakeGpu, maps_lines, read_runs

# (path option, sim kernel): alias/per-range are also exercised on a batch kernel
PATHS = [
    ("batch", SimKfdConfig()),
    ("auto", SimKfdConfig(batch_userptr=False)),   # auto on a pre-batch kernel -> alias
    ("alias", SimKfdConfig()),
    ("per-range", SimKfdConfig(batch_userptr=False)),
]
EXPECTED = {"batch": UserptrPath.BATCH, "auto": UserptrPath.ALIAS,
            "alias": UserptrPath.ALIAS, "per-range": UserptrPath.PER_RANGE}

# scattered, shuffled, some multi-page, two file-contiguous neighbours (30 then 31)
PAGES = [200, 17, 30, 31, 3, 99, 64, 5, 150, 42]
TOP = 1 << 64
COUNTS = [1, 2, 1, 3, 1, 1, 4, 1, 2, 1]


@pytest.mark.parametrize(("ranges", "merged"), [
    ([(0x10000, 0x2000), (0x12000, 0x1000)], [(0x10000, 0x3000)]),  # unequal sizes
    ([(0x10000, 0x1000), (0x11000, 0x3000), (0x14000, 0x1000)], [(0x10000, 0x5000)]),
    ([(0x10000, 0x2000), (0x11000, 0x1000)],  # overlapping: kept apart
     [(0x10000, 0x2000), (0x11000, 0x1000)]),
    ([(0x12000, 0x1000), (0x10000, 0x2000)],  # contiguous, but in the other order
     [(0x12000, 0x1000), (0x10000, 0x2000)]),
    ([(0x10000, 0x1000), (0x12000, 0x1000)], [(0x10000, 0x1000), (0x12000, 0x1000)]),
])
def test_coalesce_host_merges_exactly_the_ranges_that_continue_each_other(
        ranges: list[tuple[int, int]], merged: list[tuple[int, int]]) -> None:
    """A range joins the one before when it starts where that one ends, whatever their
    sizes; overlapping or reordered ranges stay apart (a merge would map bytes the
    guest never named, or reorder the buffer)."""
    starts, sizes = coalesce_host(np.array([r[0] for r in ranges], np.int64),
                                  np.array([r[1] for r in ranges], np.int64))
    assert list(zip(starts.tolist(), sizes.tolist(), strict=True)) == merged


@pytest.mark.parametrize("gpus", [1, 2])
@pytest.mark.parametrize(("path", "sim"), PATHS, ids=[p for p, _ in PATHS])
def test_register_resolve_zero_copy_release(make_gpu: MakeGpu, guest_ram: GuestRam,
                                            path: str, sim: SimKfdConfig, gpus: int) -> None:
    cfg = SimKfdConfig(gpu_count=gpus, batch_userptr=sim.batch_userptr)
    gpu, transport = make_gpu(cfg, userptr_path=path)
    ranges = guest_ram.ranges(PAGES, COUNTS)
    mapping = gpu.register_userptr(ranges, readonly=False)
    assert mapping.path is EXPECTED[path]
    assert mapping.size == sum(COUNTS) * PAGE
    assert mapping.gpu_ids == tuple(g.gpu_id for g in transport.kernel.gpus)
    assert gpu.live_mappings() == 1
    expected = guest_ram.file_bytes(ranges)
    for gpu_id in mapping.gpu_ids:
        memory = gpu.gpu_memory(gpu_id)
        assert memory is not None
        runs = memory.resolve(mapping.gpu_va, mapping.size, write=True)
        assert read_runs(runs) == expected
        # a window in the middle: GPU offset 5 pages + 100 bytes, 3 pages long
        window = memory.resolve(mapping.gpu_va + 5 * PAGE + 100, 3 * PAGE, write=False)
        assert read_runs(window) == expected[5 * PAGE + 100:8 * PAGE + 100]

    # buffer page index of every file page, in buffer order
    file_pages = [p + k for p, c in zip(PAGES, COUNTS, strict=True) for k in range(c)]
    memory = gpu.gpu_memory()
    assert memory is not None
    # zero copy, GPU -> memfd: write through the GPU's view of file page 31
    [(addr, n)] = memory.resolve(mapping.gpu_va + file_pages.index(31) * PAGE, PAGE,
                                 write=True)
    hostmem.view(addr, n)[:] = 0xA5
    assert os.pread(guest_ram.fd, PAGE, 31 * PAGE) == b"\xa5" * PAGE
    assert bytes(guest_ram.mem[31 * PAGE:32 * PAGE]) == b"\xa5" * PAGE
    # memfd -> GPU: a pwrite into file page 64 shows through the GPU's view
    os.pwrite(guest_ram.fd, b"guest wrote this", 64 * PAGE + 8)
    [(addr, n)] = memory.resolve(mapping.gpu_va + file_pages.index(64) * PAGE + 8, 16,
                                 write=False)
    assert hostmem.view(addr, n).tobytes() == b"guest wrote this"

    gpu.release(mapping)
    gpu.release(mapping)  # idempotent
    assert gpu.live_mappings() == 0
    assert transport.kernel.live_bos() == 0
    assert maps_lines(guest_ram.name) == 1  # only the test's own mapping of the memfd
    with pytest.raises(GpuFault, match="not mapped"):
        memory.resolve(mapping.gpu_va, 1, write=False)


@pytest.mark.parametrize(("path", "sim"), PATHS, ids=[p for p, _ in PATHS])
def test_readonly_mapping(make_gpu: MakeGpu, guest_ram: GuestRam, path: str,
                          sim: SimKfdConfig) -> None:
    gpu, _ = make_gpu(sim, userptr_path=path)
    ranges = guest_ram.ranges([9, 4], [2, 1])
    mapping = gpu.register_userptr(ranges, readonly=True)
    assert mapping.readonly
    memory = gpu.gpu_memory()
    assert memory is not None
    assert read_runs(memory.resolve(mapping.gpu_va, 3 * PAGE, write=False)) == \
        guest_ram.file_bytes(ranges)
    with pytest.raises(GpuFault, match="read-only") as exc:
        memory.resolve(mapping.gpu_va + PAGE, 8, write=True)
    assert exc.value.write and exc.value.address == mapping.gpu_va + PAGE
    if mapping.path is UserptrPath.ALIAS:  # the alias itself is mapped without PROT_WRITE
        with open("/proc/self/maps") as f:
            perms = {line.split()[1] for line in f if guest_ram.name in line}
        assert perms == {"rw-s", "r--s"}
    gpu.release(mapping)


@pytest.mark.parametrize(("path", "sim"), PATHS, ids=[p for p, _ in PATHS])
def test_invalidation_tears_down_touching_mappings(make_gpu: MakeGpu, guest_ram: GuestRam,
                                                   path: str, sim: SimKfdConfig) -> None:
    gpu, transport = make_gpu(sim, userptr_path=path)
    first = gpu.register_userptr(guest_ram.ranges([10, 50]), readonly=False)
    second = gpu.register_userptr(guest_ram.ranges([60, 11]), readonly=False)
    memory = gpu.gpu_memory()
    assert memory is not None
    # host memory of page 50 (in `first` only) is about to go away
    hit = gpu.invalidate_host_range(guest_ram.base + 50 * PAGE, PAGE)
    assert hit == [first]
    assert first.invalidated and not second.invalidated
    assert gpu.live_mappings() == 1
    with pytest.raises(GpuFault):
        memory.resolve(first.gpu_va, 2 * PAGE, write=False)
    assert read_runs(memory.resolve(second.gpu_va, 2 * PAGE, write=False)) == \
        guest_ram.file_bytes(guest_ram.ranges([60, 11]))
    gpu.release(first)  # never raises for an invalidated mapping
    assert gpu.invalidate_host_range(guest_ram.base + 100 * PAGE, 10 * PAGE) == []
    assert transport.kernel.live_bos() == len(second.private.handles)
    gpu.release(second)


def test_invalidation_before_any_teardown_faults_in_the_kernel(
        make_gpu: MakeGpu, guest_ram: GuestRam) -> None:
    """The simulated MMU notifier alone (what a real kernel does when memory is unmapped)
    already makes GPU access fault."""
    gpu, transport = make_gpu(userptr_path="batch")
    mapping = gpu.register_userptr(guest_ram.ranges([1, 2, 8]), readonly=False)
    transport.mmu_notify(guest_ram.base + 8 * PAGE, PAGE)
    memory = gpu.gpu_memory()
    assert memory is not None
    with pytest.raises(GpuFault, match="invalidated"):
        memory.resolve(mapping.gpu_va, PAGE, write=False)
    gpu.release(mapping)


def test_many_mappings_get_distinct_gpu_vas_and_vas_are_reused(make_gpu: MakeGpu,
                                                                guest_ram: GuestRam) -> None:
    gpu, _ = make_gpu(userptr_path="batch")
    mappings = [gpu.register_userptr(guest_ram.ranges([i, i + 100]), readonly=False)
                for i in range(20)]
    spans = sorted((m.gpu_va, m.gpu_va + m.size) for m in mappings)
    assert all(a_end <= b for (_, a_end), (b, _) in itertools.pairwise(spans))
    vas = {m.gpu_va for m in mappings}
    for m in mappings:
        gpu.release(m)
    again = gpu.register_userptr(guest_ram.ranges([0, 1]), readonly=False)
    assert again.gpu_va in vas
    gpu.release(again)


def test_rangeless_fd_falls_back_to_per_range_in_auto(make_gpu: MakeGpu,
                                                      guest_ram: GuestRam) -> None:
    ranges = guest_ram.ranges([5, 7])
    anon = HostRanges(ranges.addr, ranges.length, np.full(2, -1, np.int32), ranges.file_offset)
    gpu, _ = make_gpu(SimKfdConfig(batch_userptr=False))
    mapping = gpu.register_userptr(anon, readonly=False)
    assert mapping.path is UserptrPath.PER_RANGE
    gpu.release(mapping)
    explicit, _ = make_gpu(userptr_path="alias")
    with pytest.raises(HostGpuError, match="no backing file") as exc:
        explicit.register_userptr(anon, readonly=False)
    assert exc.value.errno == errno.EINVAL


def test_auto_fallback_to_per_range_keeps_its_range_limit(make_gpu: MakeGpu,
                                                          guest_ram: GuestRam) -> None:
    """Alias is impossible (no backing file): per-range takes over, but only up to its
    own limit of allocations (each one an ioctl pair on the event loop)."""
    pages = [5, 7] * (DEFAULT_LIMITS.max_per_range_ranges // 2) + [9]
    ranges = guest_ram.ranges(pages)
    anon = HostRanges(ranges.addr, ranges.length, np.full(len(pages), -1, np.int32),
                      ranges.file_offset)
    gpu, _ = make_gpu(SimKfdConfig(batch_userptr=False))
    with pytest.raises(HostGpuError, match="per-range") as exc:
        gpu.register_userptr(anon, readonly=False)
    assert exc.value.errno == errno.ENOMEM
    assert gpu.live_mappings() == 0


class _PageAlignedRangesData(abi.UserptrRangesData):
    """A range list at the start of a page, followed by enough mapped bytes that a
    pre-batch kernel can pin ``[list, list + total size)`` as a plain userptr."""

    def __init__(self, starts: np.ndarray, sizes: np.ndarray, *, reserved: int = 0) -> None:
        super().__init__(starts, sizes, reserved=reserved)
        packed = self.buffer
        room = max(packed.nbytes, int(sizes.sum())) + PAGE
        raw = np.zeros(room + PAGE, np.uint8)
        at = -raw.ctypes.data % PAGE
        self.buffer = raw[at:at + room]
        self.buffer[:packed.nbytes] = packed
        self.ranges = self.buffer[abi.header_size():packed.nbytes].view(abi.RANGE_DTYPE)


def test_batch_registration_refuses_a_kernel_that_ignored_the_batch_flag(
        make_gpu: MakeGpu, guest_ram: GuestRam, monkeypatch: pytest.MonkeyPatch) -> None:
    """The probe found USERPTR_BATCH, but an allocation comes back with a DRM mmap
    offset (the kernel registered the range list's own pages instead): the BO is
    freed unmapped, the GPU VA given back, and the error says batch is unsupported.
    Only a page-aligned list gets this far; an unaligned one is EINVAL first."""
    gpu, transport = make_gpu(userptr_path="batch")
    monkeypatch.setattr(abi, "UserptrRangesData", _PageAlignedRangesData)
    ranges = guest_ram.ranges([3, 9])
    before = gpu.register_userptr(ranges, readonly=False)  # a batch kernel: fine
    gpu.release(before)
    transport.kernel.config = dataclasses.replace(transport.kernel.config,
                                                  batch_userptr=False)
    requests: list[int] = []
    real_ioctl = transport.ioctl

    def recording(fd: int, request: int, arg: bytearray | None) -> None:
        requests.append(request)
        real_ioctl(fd, request, arg)

    monkeypatch.setattr(transport, "ioctl", recording)
    with pytest.raises(HostGpuError, match="did not treat the allocation as a batch") \
            as exc:
        gpu.register_userptr(ranges, readonly=False)
    assert exc.value.errno == errno.EOPNOTSUPP and exc.value.unsupported
    assert transport.kernel.live_bos() == 0 and gpu.live_mappings() == 0
    assert requests == [abi.AMDKFD_IOC_ALLOC_MEMORY_OF_GPU,  # never mapped on a GPU
                        abi.AMDKFD_IOC_FREE_MEMORY_OF_GPU]
    transport.kernel.config = dataclasses.replace(transport.kernel.config,
                                                  batch_userptr=True)
    again = gpu.register_userptr(ranges, readonly=False)
    assert again.gpu_va == before.gpu_va  # the refused attempt gave its VA back
    gpu.release(again)


def test_gpu_selection(make_gpu: MakeGpu, guest_ram: GuestRam) -> None:
    _, probe_t = make_gpu(SimKfdConfig(gpu_count=3))
    second = probe_t.kernel.gpus[1].gpu_id
    gpu, transport = make_gpu(SimKfdConfig(gpu_count=3), gpu_ids=(second,))
    assert gpu.info().gpu_ids == (second,)
    mapping = gpu.register_userptr(guest_ram.ranges([3]), readonly=False)
    assert mapping.gpu_ids == (second,)
    memory = gpu.gpu_memory(second)
    assert memory is not None
    assert memory.resolve(mapping.gpu_va, PAGE, write=False) == [(guest_ram.base + 3 * PAGE,
                                                                   PAGE)]
    assert gpu.gpu_memory(transport.kernel.gpus[0].gpu_id) is None  # never acquired
    gpu.release(mapping)


@pytest.mark.parametrize(("addr_delta", "length", "message"), [
    (8, PAGE, "not page aligned"),
    (0, PAGE + 8, "not page aligned"),
    (0, 0, "zero"),
    (None, PAGE, "zero"),   # range 1 at address 0
])
def test_bad_ranges_are_refused(make_gpu: MakeGpu, guest_ram: GuestRam, addr_delta: int | None,
                                length: int, message: str) -> None:
    """Refused by the back-end's own check (whose message names the host range), before
    the kernel sees them."""
    gpu, transport = make_gpu()
    ranges = guest_ram.ranges([1, 2])
    addr = ranges.addr + np.uint64(addr_delta or 0)
    if addr_delta is None:
        addr[1] = 0
    bad = HostRanges(addr, np.array([PAGE, length], dtype=np.uint64), ranges.fd,
                     ranges.file_offset)
    with pytest.raises(HostGpuError, match=f"^host range .*{message}") as exc:
        gpu.register_userptr(bad, readonly=False)
    assert exc.value.errno == errno.EINVAL
    empty = HostRanges(ranges.addr[:0], ranges.length[:0], ranges.fd[:0],
                       ranges.file_offset[:0])
    with pytest.raises(HostGpuError, match="empty"):
        gpu.register_userptr(empty, readonly=False)
    assert transport.kernel.live_bos() == 0


def test_unmapped_host_memory_is_refused(make_gpu: MakeGpu, guest_ram: GuestRam) -> None:
    gpu, transport = make_gpu(userptr_path="batch")
    gone = hostmem.map_anonymous(PAGE)
    hostmem.unmap(gone, PAGE)
    ranges = HostRanges(np.array([guest_ram.base, gone], np.uint64),
                        np.full(2, PAGE, np.uint64), np.full(2, -1, np.int32),
                        np.zeros(2, np.uint64))
    with pytest.raises(HostGpuError, match="ALLOC_MEMORY_OF_GPU") as exc:
        gpu.register_userptr(ranges, readonly=False)
    assert exc.value.errno == errno.EFAULT
    assert transport.kernel.live_bos() == 0 and gpu.live_mappings() == 0


def test_close_releases_live_mappings(make_gpu: MakeGpu, guest_ram: GuestRam) -> None:
    gpu, transport = make_gpu(userptr_path="alias")
    for i in range(3):
        gpu.register_userptr(guest_ram.ranges([i * 10, i * 10 + 5]), readonly=False)
    assert maps_lines(guest_ram.name) > 1
    gpu.close()
    gpu.close()
    assert gpu.live_mappings() == 0 and transport.kernel.live_bos() == 0
    assert maps_lines(guest_ram.name) == 1
    with pytest.raises(HostGpuError, match="closed"):
        gpu.register_userptr(guest_ram.ranges([1]), readonly=False)


@pytest.fixture
def hugetlb_fd() -> Iterator[int]:
    """A hugetlb memfd (only its file system is looked at: no huge page is needed)."""
    try:
        fd = os.memfd_create("vgpu-test-huge", os.MFD_CLOEXEC | os.MFD_HUGETLB)
    except OSError as err:
        pytest.skip(f"this kernel makes no hugetlb memfd: {err}")
    yield fd
    os.close(fd)


def file_ranges(*runs: tuple[int, int, int]) -> HostRanges:
    """Ranges ``(fd, file offset, length)``; host addresses are not looked at."""
    fds, offsets, lengths = zip(*runs, strict=True)
    return HostRanges(addr=np.array(offsets, np.uint64) + np.uint64(1 << 40),
                      length=np.array(lengths, np.uint64), fd=np.array(fds, np.int32),
                      file_offset=np.array(offsets, np.uint64))


def test_file_page_size_is_the_mapping_granule(hugetlb_fd: int, guest_ram: GuestRam) -> None:
    assert hostmem.file_page_size(hugetlb_fd) == 2 << 20
    assert hostmem.file_page_size(guest_ram.fd) == PAGE


def test_alias_refuses_runs_a_hugetlb_file_cannot_map(hugetlb_fd: int,
                                                      guest_ram: GuestRam) -> None:
    huge, small = 2 << 20, guest_ram.fd
    assert alias_refusal(file_ranges((hugetlb_fd, huge, huge), (hugetlb_fd, 0, huge))) is None
    assert alias_refusal(file_ranges((hugetlb_fd, 0, huge), (small, 0, PAGE))) is None
    for bad in [file_ranges((hugetlb_fd, 0, PAGE)),                      # part of a page
                file_ranges((hugetlb_fd, PAGE, huge)),                   # unaligned offset
                file_ranges((small, 0, PAGE), (hugetlb_fd, 0, huge))]:   # lands unaligned
        assert "hugetlb" in (alias_refusal(bad) or "")
    assert alias_refusal(file_ranges((small, PAGE, PAGE), (small, 9 * PAGE, 3 * PAGE))) is None


@pytest.mark.parametrize(("addr", "length"), [
    (TOP - PAGE, PAGE),        # the address is beyond user space; the end wraps to 0
    (1 << 63, PAGE),           # the first address beyond user space
    ((1 << 63) - PAGE, PAGE),  # ends exactly at 2^63
    (PAGE, TOP - PAGE),        # the length wraps the end below the start
])
def test_ranges_reaching_beyond_user_space_are_refused(make_gpu: MakeGpu, guest_ram: GuestRam,
                                                       addr: int, length: int) -> None:
    gpu, transport = make_gpu()
    ranges = guest_ram.ranges([1, 2])
    bad = HostRanges(np.array([int(ranges.addr[0]), addr], dtype=np.uint64),
                     np.array([PAGE, length], dtype=np.uint64), ranges.fd, ranges.file_offset)
    with pytest.raises(HostGpuError, match=r"^host range 1 .*beyond user space") as exc:
        gpu.register_userptr(bad, readonly=False)
    assert exc.value.errno == errno.EINVAL and transport.kernel.live_bos() == 0


# --- invalidation matching, coalescing, path corner cases ----------------------------------


def test_invalidation_matches_the_host_ranges_exactly(make_gpu: MakeGpu,
                                                      guest_ram: GuestRam) -> None:
    """Only ranges intersecting the invalidated bytes hit, whatever the ranges' order;
    touching neighbours do not."""
    gpu, _ = make_gpu()
    # buffer order: page 20, then pages 5-6 (the lowest host page is not the first)
    mapping = gpu.register_userptr(guest_ram.ranges([20, 5], [1, 2]), readonly=False)
    for page in (4, 7, 19, 21):
        assert gpu.invalidate_host_range(guest_ram.base + page * PAGE, PAGE) == []
    hit = gpu.invalidate_host_range(guest_ram.base + 6 * PAGE, PAGE)
    assert len(hit) == 1 and hit[0] is mapping and mapping.invalidated


def test_alias_never_merges_runs_of_different_files(make_gpu: MakeGpu,
                                                    guest_ram: GuestRam) -> None:
    """File offsets that continue each other in two files are two runs."""
    other = GuestRam(4, f"other-ram-{os.getpid()}")
    try:
        other.mem[:] = 0x5A
        a, b = guest_ram.ranges([0]), other.ranges([1])   # file offsets 0, then PAGE
        ranges = HostRanges(**{name: np.concatenate([getattr(a, name), getattr(b, name)])
                               for name in ("addr", "length", "fd", "file_offset")})
        gpu, _ = make_gpu(userptr_path="alias")
        mapping = gpu.register_userptr(ranges, readonly=True)
        memory = gpu.gpu_memory()
        assert memory is not None
        got = read_runs(memory.resolve(mapping.gpu_va, 2 * PAGE, write=False))
        assert got == guest_ram.file_bytes(a) + b"\x5a" * PAGE
        gpu.release(mapping)
    finally:
        other.close()


def test_per_range_allocates_one_bo_per_host_contiguous_run(make_gpu: MakeGpu,
                                                           guest_ram: GuestRam) -> None:
    gpu, transport = make_gpu(userptr_path="per-range")
    mapping = gpu.register_userptr(guest_ram.ranges([30, 31, 32, 40]), readonly=False)
    assert transport.kernel.live_bos() == 2
    gpu.release(mapping)


def test_alias_of_host_contiguous_ranges_without_a_file_is_one_userptr(
        make_gpu: MakeGpu, guest_ram: GuestRam) -> None:
    """Ranges already contiguous in host VA are their own alias: no file is needed."""
    gpu, transport = make_gpu(userptr_path="alias")
    ranges = guest_ram.ranges([8, 9, 10])
    ranges.fd[:] = -1
    mapping = gpu.register_userptr(ranges, readonly=False)
    assert transport.kernel.live_bos() == 1
    memory = gpu.gpu_memory()
    assert memory is not None
    assert memory.resolve(mapping.gpu_va, 3 * PAGE, write=True) == [
        (guest_ram.base + 8 * PAGE, 3 * PAGE)]
    gpu.release(mapping)


def test_aligned_reservations_start_on_the_alignment() -> None:
    huge = 2 << 20
    reserved = [(_reserve_aligned(n * PAGE, huge), n * PAGE) for n in (1, 3, 5)]
    try:
        assert [start % huge for start, _ in reserved] == [0, 0, 0]
    finally:
        for start, length in reserved:
            hostmem.unmap(start, length)


def _mapped_within(start: int, end: int) -> list[tuple[int, int]]:
    """The pieces of ``[start, end)`` that /proc/self/maps shows mapped (any access)."""
    pieces = []
    with open("/proc/self/maps") as maps:
        for line in maps:
            lo, hi = (int(x, 16) for x in line.split(None, 1)[0].split("-"))
            if lo < end and hi > start:
                pieces.append((max(lo, start), min(hi, end)))
    return pieces


@pytest.mark.parametrize("pages", [1, 3, 512])
def test_aligned_reservations_give_back_the_slack(monkeypatch: pytest.MonkeyPatch,
                                                  pages: int) -> None:
    """Aligning a reservation over-reserves by the alignment and unmaps the slack on
    both sides: only ``[start, start + length)`` stays reserved."""
    huge = 2 << 20
    raw: list[int] = []
    real_reserve = hostmem.reserve

    def recording(length: int) -> int:
        raw.append(real_reserve(length))
        return raw[-1]

    monkeypatch.setattr(hostmem, "reserve", recording)
    length = pages * PAGE
    start = _reserve_aligned(length, huge)
    try:
        assert start % huge == 0 and len(raw) == 1
        assert raw[0] <= start and start + length <= raw[0] + length + huge
        assert _mapped_within(raw[0], raw[0] + length + huge) == [(start, start + length)]
    finally:
        hostmem.unmap(start, length)
    plain = _reserve_aligned(length, PAGE)  # page alignment: a plain reservation
    hostmem.unmap(plain, length)
    assert raw[1:] == [plain]

