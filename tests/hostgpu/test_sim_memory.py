"""The simulated KFD's memory ioctls: ALLOC (plain and batch, §3.5/§4.3), MAP/UNMAP with
n_success and copy-back (§3.7), FREE, the pre-batch trap, the MMU notifier."""

from __future__ import annotations

import ctypes
import errno
import mmap
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from vgpu_backend.hostgpu import hostmem
from vgpu_backend.hostgpu import kfd_abi as abi
from vgpu_backend.hostgpu.base import GpuFault
from vgpu_backend.hostgpu.sim_config import SimFault, SimKfdConfig

from .helpers import PAGE, GuestRam, RawKfd, ranges_data

Raw = Callable[..., RawKfd]
USERPTR = abi.KFD_IOC_ALLOC_MEM_FLAGS_USERPTR
BATCH = USERPTR | abi.KFD_IOC_ALLOC_MEM_FLAGS_USERPTR_BATCH
WRITABLE = abi.KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE


@pytest.fixture
def raw(raw_kfd: Raw) -> RawKfd:
    r = raw_kfd(SimKfdConfig(gpu_count=2))
    r.acquire(0)
    r.acquire(1)
    return r


@pytest.fixture
def ram(guest_ram: GuestRam) -> GuestRam:
    return guest_ram


def va(raw: RawKfd, page: int = 0) -> int:
    return raw.gpus[0].gpuvm_base + page * PAGE


# --- plain userptr -----------------------------------------------------------------------


def test_plain_alloc_rules(raw: RawKfd, ram: GuestRam) -> None:
    p = ram.base
    g = raw.gpus[0]
    assert raw.alloc(va(raw), 0, p, USERPTR)[0] == errno.EINVAL                  # size 0
    assert raw.alloc(va(raw), PAGE, p, USERPTR, gpu_id=0x1234)[0] == errno.EINVAL  # gpu_id
    assert raw.alloc(va(raw), PAGE, 0, USERPTR)[0] == errno.EINVAL                # NULL
    assert raw.alloc(va(raw), PAGE, p, abi.KFD_IOC_ALLOC_MEM_FLAGS_VRAM)[0] == errno.EINVAL
    assert raw.alloc(va(raw), PAGE, p,                       # BATCH without USERPTR
                     abi.KFD_IOC_ALLOC_MEM_FLAGS_USERPTR_BATCH)[0] == errno.EINVAL
    assert raw.alloc(va(raw), PAGE, p + 8, USERPTR)[0] == errno.EINVAL            # unaligned
    assert raw.alloc(va(raw) + 8, PAGE, p, USERPTR)[0] == errno.EINVAL            # GPU VA
    assert raw.alloc(g.gpuvm_base - PAGE, PAGE, p, USERPTR)[0] == errno.EINVAL    # aperture
    assert raw.alloc(g.gpuvm_limit + 1 - PAGE, 2 * PAGE, p, USERPTR)[0] == errno.EINVAL
    assert raw.alloc(va(raw), PAGE, PAGE, USERPTR)[0] == errno.EFAULT             # unmapped
    err, bo = raw.alloc(va(raw), PAGE + 1, p, USERPTR | WRITABLE)   # size rounds up
    assert err == 0
    assert abi.handle_gpu_id(bo.handle) == g.gpu_id
    assert bo.mmap_offset != 0  # a DRM mmap offset for a plain userptr
    assert raw.alloc(va(raw, 1), PAGE, p, USERPTR)[0] == errno.EINVAL   # overlaps the BO
    assert raw.alloc(va(raw, 2), PAGE, p, USERPTR)[0] == 0              # next to it: fine
    assert raw.t.kernel.live_bos() == 2


def test_readonly_memory_needs_readonly_bo(raw: RawKfd) -> None:
    ro = hostmem.map_anonymous(PAGE)
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        assert libc.mprotect(ctypes.c_void_p(ro), PAGE, mmap.PROT_READ) == 0
        assert raw.alloc(va(raw), PAGE, ro, USERPTR | WRITABLE)[0] == errno.EFAULT
        err, bo = raw.alloc(va(raw), PAGE, ro, USERPTR)
        assert err == 0
        assert raw.free(bo.handle) == 0
    finally:
        hostmem.unmap(ro, PAGE)


def test_memory_limit_and_svm(raw_kfd: Raw, ram: GuestRam) -> None:
    raw = raw_kfd(SimKfdConfig(userptr_limit=4 * PAGE))
    raw.acquire()
    assert raw.alloc(va(raw), 5 * PAGE, ram.base, USERPTR)[0] == errno.ENOMEM
    kernel = raw.t.kernel
    kernel.svm_ranges.append((va(raw, 100), PAGE))
    assert raw.alloc(va(raw, 99), 2 * PAGE, ram.base, USERPTR)[0] == errno.EADDRINUSE
    kernel.svm_ranges[:] = [(ram.base + 3 * PAGE, PAGE)]
    assert raw.alloc(va(raw), 4 * PAGE, ram.base, USERPTR)[0] == errno.EADDRINUSE
    kernel.inject(SimFault("ALLOC_MEMORY_OF_GPU", errno.ENOMEM))
    assert raw.alloc(va(raw), PAGE, ram.base, USERPTR)[0] == errno.ENOMEM
    assert raw.alloc(va(raw), PAGE, ram.base, USERPTR)[0] == 0


# --- batch -------------------------------------------------------------------------------


def test_batch_alloc_rules(raw: RawKfd, ram: GuestRam) -> None:
    b = ram.base

    def batch(starts: list[int], sizes: list[int], size: int | None = None, *,
              reserved: int = 0, flags: int = BATCH) -> int:
        data = ranges_data(starts, sizes, reserved)
        total = sum(sizes) if size is None else size
        return raw.alloc(va(raw), total, data.address, flags)[0]

    assert batch([b], [PAGE], size=0) == errno.EINVAL
    assert raw.alloc(va(raw), PAGE, 0, BATCH)[0] == errno.EINVAL                 # NULL list
    assert raw.alloc(va(raw), PAGE, PAGE, BATCH)[0] == errno.EFAULT              # bad header
    empty = abi.UserptrRangesData(np.zeros(0, np.uint64), np.zeros(0, np.uint64))
    assert raw.alloc(va(raw), PAGE, empty.address, BATCH)[0] == errno.EINVAL     # 0 ranges
    assert batch([b], [PAGE], reserved=1) == errno.EINVAL
    assert batch([b, 0], [PAGE, PAGE]) == errno.EINVAL                           # zero start
    assert batch([b, b + PAGE], [PAGE, 0]) == errno.EINVAL                        # zero size
    assert batch([b + 512], [PAGE]) == errno.EINVAL                               # unaligned
    assert batch([b], [PAGE + 512], size=PAGE + 512) == errno.EINVAL              # unaligned
    assert batch([b, b + 4 * PAGE], [PAGE, PAGE], size=3 * PAGE) == errno.EINVAL  # sum
    assert batch([b, PAGE], [PAGE, PAGE]) == errno.EFAULT                         # unmapped
    assert batch([b], [PAGE], flags=BATCH | abi.KFD_IOC_ALLOC_MEM_FLAGS_AQL_QUEUE_MEM
                 ) == errno.EINVAL
    assert raw.t.kernel.live_bos() == 0
    assert batch([b + 9 * PAGE, b, b + 3 * PAGE], [PAGE, 2 * PAGE, PAGE]) == 0


def test_batch_list_running_into_unmapped_memory_is_efault(raw: RawKfd, ram: GuestRam) -> None:
    two = hostmem.map_anonymous(2 * PAGE)
    hostmem.unmap(two + PAGE, PAGE)  # header at the end of page 0, ranges would follow
    try:
        hdr = two + PAGE - abi.header_size()
        hostmem.view(hdr, abi.header_size())[:] = np.frombuffer(
            (1).to_bytes(4, "little") + bytes(4), dtype=np.uint8)
        assert raw.alloc(va(raw), PAGE, hdr, BATCH)[0] == errno.EFAULT
    finally:
        hostmem.unmap(two, PAGE)


def test_batch_bo_maps_ranges_in_order(raw: RawKfd, ram: GuestRam) -> None:
    pages = [7, 2, 3, 40]
    data = ranges_data([ram.base + p * PAGE for p in pages], [PAGE] * 4)
    err, bo = raw.alloc(va(raw), 4 * PAGE, data.address, BATCH | WRITABLE)
    assert (err, bo.mmap_offset) == (0, 0)
    ids = [g.gpu_id for g in raw.gpus]
    assert raw.map(bo.handle, ids)[0] == 0
    for gpu_id in ids:
        vm = raw.t.gpu_memory(raw.fd, gpu_id)
        assert vm is not None
        runs = vm.resolve(va(raw), 4 * PAGE, write=True)
        assert runs == [(ram.base + 7 * PAGE, PAGE), (ram.base + 2 * PAGE, 2 * PAGE),
                        (ram.base + 40 * PAGE, PAGE)]


def test_pre_batch_kernel_registers_the_list_itself(raw_kfd: Raw, ram: GuestRam) -> None:
    """The trap: bit 22 ignored, [mmap_offset, +size) becomes the userptr."""
    raw = raw_kfd(SimKfdConfig(batch_userptr=False))
    gpu_id = raw.acquire()
    probe = hostmem.map_anonymous(2 * PAGE)
    try:
        data = ranges_data([ram.base], [PAGE])
        hostmem.view(probe, data.nbytes)[:] = data.buffer
        err, bo = raw.alloc(va(raw), PAGE, probe, BATCH)
        assert err == 0 and bo.mmap_offset != 0
        assert raw.map(bo.handle, [gpu_id])[0] == 0
        vm = raw.t.gpu_memory(raw.fd, gpu_id)
        assert vm is not None
        assert vm.resolve(va(raw), PAGE, write=False) == [(probe, PAGE)]  # not guest RAM
        assert raw.map(bo.handle, [gpu_id], unmap=True)[0] == 0
        assert raw.free(bo.handle) == 0
    finally:
        hostmem.unmap(probe, 2 * PAGE)


# --- map / unmap / free ------------------------------------------------------------------


@pytest.fixture
def bo(raw: RawKfd, ram: GuestRam) -> Iterator[int]:
    err, out = raw.alloc(va(raw), 2 * PAGE, ram.base, USERPTR | WRITABLE)
    assert err == 0
    yield out.handle


def test_map_argument_rules(raw: RawKfd, bo: int) -> None:
    ids = [g.gpu_id for g in raw.gpus]
    assert raw.map(bo, [])[0] == errno.EINVAL                                   # n_devices 0
    assert raw.map(bo, ids, n_success=3)[0] == errno.EINVAL                     # > n_devices
    bad_ptr = raw.call(abi.AMDKFD_IOC_MAP_MEMORY_TO_GPU,
                       abi.MapMemoryToGpuArgs(bo, PAGE, 2, 0))
    assert bad_ptr[0] == errno.EFAULT
    assert raw.map(bo + 99, ids)[0] == errno.ENOMEM                             # unknown handle
    assert raw.map(abi.make_handle(0x77, 1), ids)[0] == errno.EINVAL           # unknown GPU
    assert raw.map(bo + 99, ids, unmap=True)[0] == errno.EINVAL


def test_map_reports_progress_and_copies_back_on_error(raw: RawKfd, bo: int) -> None:
    g0, g1 = (g.gpu_id for g in raw.gpus)
    err, out = raw.map(bo, [g0, 0xBAD])
    assert (err, out.n_success) == (errno.EINVAL, 1)   # g0 mapped, then the bad id
    vm0, vm1 = (raw.t.kernel.vm_of(raw.fd, g) for g in (g0, g1))
    assert vm0 is not None and vm1 is not None
    assert len(vm0) == 1 and len(vm1) == 0
    err, out = raw.map(bo, [g0, g1], n_success=1)       # resume: only g1 is done now
    assert (err, out.n_success) == (0, 2)
    assert len(vm1) == 1
    assert raw.free(bo) == errno.EBUSY                  # still mapped
    assert raw.map(bo, [g0, g1], unmap=True)[0] == 0
    err, out = raw.map(bo, [g0, g1], unmap=True)        # no longer mapped
    assert (err, out.n_success) == (errno.EINVAL, 0)
    assert raw.free(bo) == 0
    assert raw.free(bo) == errno.EINVAL                 # already freed


def test_map_on_unacquired_gpu_is_enodev(raw_kfd: Raw, ram: GuestRam) -> None:
    raw = raw_kfd(SimKfdConfig(gpu_count=2))
    g0 = raw.acquire(0)
    err, out = raw.alloc(va(raw), PAGE, ram.base, USERPTR)
    err, res = raw.map(out.handle, [g0, raw.gpus[1].gpu_id])
    assert (err, res.n_success) == (errno.ENODEV, 1)
    assert raw.map(out.handle, [g0], unmap=True)[0] == 0
    assert raw.free(out.handle) == 0


def test_map_outside_a_peer_aperture_is_einval(raw_kfd: Raw, ram: GuestRam) -> None:
    raw = raw_kfd(SimKfdConfig(gpu_count=2, aperture_skew=1 << 20))
    g0, g1 = raw.acquire(0), raw.acquire(1)
    err, out = raw.alloc(va(raw), PAGE, ram.base, USERPTR)  # inside GPU 0's only
    assert err == 0
    err, res = raw.map(out.handle, [g0, g1])
    assert (err, res.n_success) == (errno.EINVAL, 1)
    assert raw.map(out.handle, [g0], unmap=True)[0] == 0
    assert raw.free(out.handle) == 0


def test_injected_map_faults(raw: RawKfd, bo: int) -> None:
    ids = [g.gpu_id for g in raw.gpus]
    kernel = raw.t.kernel
    kernel.inject(SimFault("MAP_MEMORY_TO_GPU", errno.EINTR))
    err, out = raw.map(bo, ids)
    assert (err, out.n_success) == (errno.EINTR, 2)  # everything mapped, then "signal"
    err, out = raw.map(bo, ids, n_success=out.n_success)  # the restart is a no-op
    assert (err, out.n_success) == (0, 2)
    kernel.inject(SimFault("UNMAP_MEMORY_FROM_GPU", errno.EIO, device_index=1))
    err, out = raw.map(bo, ids, unmap=True)
    assert (err, out.n_success) == (errno.EIO, 1)
    err, out = raw.map(bo, ids, n_success=1, unmap=True)
    assert (err, out.n_success) == (0, 2)
    assert raw.free(bo) == 0


# --- MMU notifier ------------------------------------------------------------------------


def test_mmu_notifier_invalidates_touching_bos(raw: RawKfd, ram: GuestRam) -> None:
    g0 = raw.gpus[0].gpu_id
    data = ranges_data([ram.base + 10 * PAGE, ram.base + 20 * PAGE], [PAGE, PAGE])
    err, first = raw.alloc(va(raw), 2 * PAGE, data.address, BATCH)
    err2, second = raw.alloc(va(raw, 8), PAGE, ram.base + 30 * PAGE, USERPTR)
    assert err == err2 == 0
    assert raw.map(first.handle, [g0])[0] == raw.map(second.handle, [g0])[0] == 0
    vm = raw.t.gpu_memory(raw.fd, g0)
    assert vm is not None
    assert vm.resolve(va(raw), 2 * PAGE, write=False) == [(ram.base + 10 * PAGE, PAGE),
                                                           (ram.base + 20 * PAGE, PAGE)]
    assert raw.t.kernel.mmu_invalidate(ram.base + 20 * PAGE, PAGE) == 1
    assert raw.t.kernel.mmu_invalidate(ram.base + 10 * PAGE, PAGE) == 0  # already invalid
    # the whole BO is invalid (the kernel evicts it as one), from its first page on
    with pytest.raises(GpuFault, match="invalidated") as exc:
        vm.resolve(va(raw, 1), PAGE, write=False)
    assert exc.value.address == va(raw, 1)
    with pytest.raises(GpuFault, match="invalidated") as exc:
        vm.resolve(va(raw), PAGE, write=False)
    assert exc.value.address == va(raw)
    assert vm.resolve(va(raw, 8), PAGE, write=False) == [(ram.base + 30 * PAGE, PAGE)]
    for handle in (first.handle, second.handle):
        assert raw.map(handle, [g0], unmap=True)[0] == 0
        assert raw.free(handle) == 0


# --- boundaries of the ALLOC rules -------------------------------------------------------


def test_plain_size_rounds_up_to_whole_pages(raw: RawKfd, ram: GuestRam) -> None:
    """``PAGE_ALIGN(size)``: the BO, its GPU mapping and its charge are whole pages."""
    g0 = raw.gpus[0].gpu_id
    err, bo = raw.alloc(va(raw), PAGE + 1, ram.base, USERPTR)
    assert err == 0
    assert raw.t.kernel.userptr_charged == 2 * PAGE
    assert raw.map(bo.handle, [g0])[0] == 0
    vm = raw.t.gpu_memory(raw.fd, g0)
    assert vm is not None
    assert vm.resolve(va(raw), 2 * PAGE, write=False) == [(ram.base, 2 * PAGE)]
    assert raw.map(bo.handle, [g0], unmap=True)[0] == 0
    assert raw.free(bo.handle) == 0


def test_the_last_page_of_the_aperture_is_usable(raw: RawKfd, ram: GuestRam) -> None:
    """``gpuvm_limit`` is inclusive: a BO ending at it is inside, on every GPU."""
    last = raw.gpus[0].gpuvm_limit + 1 - PAGE
    err, bo = raw.alloc(last, PAGE, ram.base, USERPTR)
    assert err == 0
    ids = [g.gpu_id for g in raw.gpus]
    assert raw.map(bo.handle, ids)[0] == 0
    assert raw.map(bo.handle, ids, unmap=True)[0] == 0
    assert raw.free(bo.handle) == 0


def test_userptr_limit_is_inclusive_and_freeing_uncharges(raw_kfd: Raw, ram: GuestRam) -> None:
    raw = raw_kfd(SimKfdConfig(userptr_limit=4 * PAGE))
    raw.acquire()
    err, bo = raw.alloc(va(raw), 4 * PAGE, ram.base, USERPTR)   # exactly the limit
    assert err == 0
    assert raw.alloc(va(raw, 8), PAGE, ram.base, USERPTR)[0] == errno.ENOMEM
    assert raw.free(bo.handle) == 0
    assert raw.alloc(va(raw, 8), PAGE, ram.base, USERPTR)[0] == 0


def test_a_bo_may_end_where_another_begins(raw: RawKfd, ram: GuestRam) -> None:
    assert raw.alloc(va(raw, 5), PAGE, ram.base, USERPTR)[0] == 0
    assert raw.alloc(va(raw, 4), PAGE, ram.base, USERPTR)[0] == 0       # ends at page 5
    assert raw.alloc(va(raw, 3), 2 * PAGE, ram.base, USERPTR)[0] == errno.EINVAL
    assert raw.t.kernel.live_bos() == 2


@pytest.mark.parametrize(("svm_page", "gpu_page", "cpu_page"), [
    (100, 99, 0),     # GPU VA ends where the SVM range starts
    (100, 101, 0),    # GPU VA starts where it ends
    (3, 10, 0),       # CPU range [0, 3) ends where it starts
    (3, 10, 4),       # CPU range starts where it ends
], ids=["gpu-before", "gpu-after", "cpu-before", "cpu-after"])
def test_svm_ranges_refuse_overlaps_only(raw: RawKfd, ram: GuestRam, svm_page: int,
                                         gpu_page: int, cpu_page: int) -> None:
    """EADDRINUSE is for intersecting ranges; touching ones are fine."""
    cpu_svm = svm_page < 50  # small page numbers name guest RAM pages, large GPU pages
    start = ram.base + svm_page * PAGE if cpu_svm else va(raw, svm_page)
    raw.t.kernel.svm_ranges.append((start, PAGE))
    assert raw.alloc(va(raw, gpu_page), 3 * PAGE if cpu_svm else PAGE,
                     ram.base + cpu_page * PAGE, USERPTR)[0] == 0


def _batch_wrapping_to_one_page(raw: RawKfd, ram: GuestRam) -> int:
    # sizes 2 pages and 2**64 - 1 page: their u64 sum is one page, as ``size`` says
    data = ranges_data([ram.base, ram.base + 10 * PAGE], [2 * PAGE, (1 << 64) - PAGE])
    return raw.alloc(va(raw), PAGE, data.address, BATCH)[0]


@pytest.mark.parametrize("alloc", [
    lambda raw, ram: raw.alloc(va(raw), PAGE, 1 << 63, USERPTR)[0],
    lambda raw, ram: raw.alloc(va(raw), (1 << 64) - 1, ram.base, USERPTR)[0],
    _batch_wrapping_to_one_page,
], ids=["plain-address-above-user-space", "plain-size-2**64-1", "batch-size-wrapping-u64"])
def test_ranges_beyond_user_space_are_efault(raw: RawKfd, ram: GuestRam,
                                             alloc: Callable[[RawKfd, GuestRam], int]) -> None:
    """get_user_pages fails on anything not below the top of user space, also when a
    u64 sum or end wraps around."""
    assert alloc(raw, ram) == errno.EFAULT
    assert raw.t.kernel.live_bos() == 0


def test_a_range_list_too_big_for_kvmalloc_is_enomem(raw: RawKfd) -> None:
    """2**27 ranges are 2 GiB of list: ENOMEM before the kernel reads any of it."""
    header = abi.UserptrRangesData(np.zeros(0, np.uint64), np.zeros(0, np.uint64))
    header.buffer[:4] = np.frombuffer((1 << 27).to_bytes(4, "little"), dtype=np.uint8)
    assert raw.alloc(va(raw), PAGE, header.address, BATCH)[0] == errno.ENOMEM


def test_map_of_a_handle_on_an_unacquired_gpu_is_enodev(raw_kfd: Raw) -> None:
    raw = raw_kfd(SimKfdConfig(gpu_count=2))
    g0 = raw.acquire(0)
    handle = abi.make_handle(raw.gpus[1].gpu_id, 1)
    assert raw.map(handle, [g0])[0] == errno.ENODEV
    assert raw.map(handle, [g0], unmap=True)[0] == errno.ENODEV
