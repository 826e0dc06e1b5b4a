"""KfdHostGpu bookkeeping: which path a registration takes, release and invalidation
when teardown fails, close() going on past failures, and the host GPU after close."""

from __future__ import annotations

import errno
import logging

import numpy as np
import pytest

from vgpu_backend.hostgpu import hostmem
from vgpu_backend.hostgpu import kfd_abi as abi
from vgpu_backend.hostgpu.base import GpuFault, HostGpuError, HostRanges, UserptrPath
from vgpu_backend.hostgpu.factory import HostGpuOptions, create_host_gpu
from vgpu_backend.hostgpu.kfd import CONTEXT_USERPTR_UNSUPPORTED, KfdHostGpu
from vgpu_backend.hostgpu.sim_config import SimFault, SimKfdConfig
from vgpu_backend.hostgpu.sim_kfd import SimTransport

from .helpers import (
    PAGE,
    GuestRam,
    MakeGpu,
    assert_no_new_fds,
    fail_unmap_once,
    maps_lines,
    open_fds,
)


def fileless(ranges: HostRanges) -> HostRanges:
    """``ranges`` without a backing file (alias cannot map them)."""
    return HostRanges(ranges.addr, ranges.length, np.full(len(ranges), -1, np.int32),
                      ranges.file_offset)


def sim_gpu(path: str, config: SimKfdConfig | None = None
            ) -> tuple[KfdHostGpu, SimTransport]:
    """A sim host GPU without the leak-checking fixture (for failures that leave BOs in
    the primary KFD process, which outlives its fds)."""
    t = SimTransport(config or SimKfdConfig())
    gpu = create_host_gpu(HostGpuOptions(gpu="sim", userptr_path=path), transport=t)
    assert isinstance(gpu, KfdHostGpu)
    return gpu, t


class Interrupted(SimTransport):
    """ALLOC_MEMORY_OF_GPU raises KeyboardInterrupt (a signal) once armed."""

    armed = False

    def ioctl(self, fd: int, request: int, arg: bytearray | None) -> None:
        if self.armed and request == abi.AMDKFD_IOC_ALLOC_MEMORY_OF_GPU:
            self.armed = False
            raise KeyboardInterrupt
        super().ioctl(fd, request, arg)


# --- register_userptr ------------------------------------------------------------------------


def test_auto_falls_back_to_per_range_up_to_its_limit_inclusive(make_gpu: MakeGpu,
                                                                guest_ram: GuestRam) -> None:
    """Exactly ``max_per_range_ranges`` ranges still register on the per-range fallback;
    one more is ENOMEM."""
    gpu, _ = make_gpu(SimKfdConfig(batch_userptr=False), max_per_range_ranges=4)
    mapping = gpu.register_userptr(fileless(guest_ram.ranges([1, 3, 5, 7])), readonly=False)
    assert mapping.path is UserptrPath.PER_RANGE
    gpu.release(mapping)
    with pytest.raises(HostGpuError, match="exceed") as exc:
        gpu.register_userptr(fileless(guest_ram.ranges([1, 3, 5, 7, 9])), readonly=False)
    assert exc.value.errno == errno.ENOMEM


def test_auto_batch_takes_ranges_alias_could_not_map(make_gpu: MakeGpu,
                                                     guest_ram: GuestRam) -> None:
    """The per-range fallback is for auto's alias only: batch registers file-less ranges
    itself."""
    gpu, _ = make_gpu()
    mapping = gpu.register_userptr(fileless(guest_ram.ranges([5, 7])), readonly=False)
    assert mapping.path is UserptrPath.BATCH
    gpu.release(mapping)


def test_eopnotsupp_on_the_primary_process_keeps_the_kernel_message(
        make_gpu: MakeGpu, guest_ram: GuestRam) -> None:
    """Only secondary processes turn EOPNOTSUPP into the context-isolation refusal."""
    gpu, t = make_gpu()
    t.kernel.inject(SimFault("ALLOC_MEMORY_OF_GPU", errno.EOPNOTSUPP))
    with pytest.raises(HostGpuError, match="ALLOC_MEMORY_OF_GPU") as exc:
        gpu.register_userptr(guest_ram.ranges([2]), readonly=False)
    assert exc.value.errno == errno.EOPNOTSUPP and not exc.value.unsupported
    assert str(exc.value) != CONTEXT_USERPTR_UNSUPPORTED


def test_interrupted_registration_gives_its_gpu_va_back(make_gpu: MakeGpu,
                                                        guest_ram: GuestRam) -> None:
    """A non-HostGpuError exception (a signal) during registration frees the GPU VA:
    the next buffer gets the same address."""
    gpu, _ = make_gpu(transport=Interrupted(SimKfdConfig()))
    first = gpu.register_userptr(guest_ram.ranges([1]), readonly=False)
    va = first.gpu_va
    gpu.release(first)
    assert isinstance(gpu._t, Interrupted)
    gpu._t.armed = True
    with pytest.raises(KeyboardInterrupt):
        gpu.register_userptr(guest_ram.ranges([1]), readonly=False)
    assert gpu.live_mappings() == 0
    again = gpu.register_userptr(guest_ram.ranges([1]), readonly=False)
    assert again.gpu_va == va
    gpu.release(again)


# --- release, invalidation ---------------------------------------------------------------------


def test_release_invalidates_the_mapping_even_when_the_kernel_refuses(
        make_gpu: MakeGpu, guest_ram: GuestRam) -> None:
    """A mapping being released is marked invalidated first: also when teardown fails
    and the mapping stays live for a retry."""
    gpu, t = make_gpu()
    mapping = gpu.register_userptr(guest_ram.ranges([1, 4]), readonly=False)
    t.kernel.inject(SimFault("FREE_MEMORY_OF_GPU", errno.EIO))
    with pytest.raises(HostGpuError):
        gpu.release(mapping)
    assert mapping.invalidated and gpu.live_mappings() == 1
    gpu.release(mapping)
    assert mapping.invalidated and gpu.live_mappings() == 0


def test_invalidation_notifies_the_kernel_even_if_teardown_fails(
        make_gpu: MakeGpu, guest_ram: GuestRam) -> None:
    """The MMU notification reaches the kernel: a BO whose unmap is refused faults on
    the GPU all the same."""
    gpu, t = make_gpu()
    mapping = gpu.register_userptr(guest_ram.ranges([3, 4]), readonly=False)
    t.kernel.inject(SimFault("UNMAP_MEMORY_FROM_GPU", errno.EIO, device_index=0))
    assert gpu.invalidate_host_range(guest_ram.base + 4 * PAGE, PAGE) == [mapping]
    assert t.kernel.live_bos() == 1   # still mapped in the kernel, kept for close()
    memory = gpu.gpu_memory()
    assert memory is not None
    with pytest.raises(GpuFault, match="invalidated"):
        memory.resolve(mapping.gpu_va, PAGE, write=False)


def test_one_byte_invalidations(make_gpu: MakeGpu, guest_ram: GuestRam) -> None:
    """A single byte at the start of a range hits it; the byte before does not."""
    gpu, _ = make_gpu()
    mapping = gpu.register_userptr(guest_ram.ranges([5]), readonly=False)
    assert gpu.invalidate_host_range(guest_ram.base + 5 * PAGE - 1, 1) == []
    assert gpu.invalidate_host_range(guest_ram.base + 5 * PAGE, 1) == [mapping]
    assert gpu.live_mappings() == 0


def test_invalidation_goes_on_past_a_failed_teardown(make_gpu: MakeGpu,
                                                     guest_ram: GuestRam) -> None:
    """Two mappings share the invalidated page; the first one's teardown fails: the
    second is torn down all the same, the first is finished at close."""
    gpu, t = make_gpu()
    first = gpu.register_userptr(guest_ram.ranges([7, 8]), readonly=False)
    second = gpu.register_userptr(guest_ram.ranges([8, 20]), readonly=False)
    t.kernel.inject(SimFault("UNMAP_MEMORY_FROM_GPU", errno.EIO, device_index=0))
    assert gpu.invalidate_host_range(guest_ram.base + 8 * PAGE, PAGE) == [first, second]
    assert first.invalidated and second.invalidated
    assert gpu.live_mappings() == 0
    assert t.kernel.live_bos() == 1   # the first one's BO, left for close()


def test_invalidation_survives_a_failing_munmap_of_the_alias(
        make_gpu: MakeGpu, guest_ram: GuestRam, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """An OSError from teardown (munmap of the alias) is logged, not raised; close()
    unmaps the alias."""
    gpu, t = make_gpu(userptr_path="alias")
    mapping = gpu.register_userptr(guest_ram.ranges([7, 20]), readonly=False)
    assert mapping.private.alias is not None
    fail_unmap_once(monkeypatch, mapping.private.alias[0])
    with caplog.at_level(logging.ERROR, logger="vgpu_backend.hostgpu.kfd"):
        assert gpu.invalidate_host_range(guest_ram.base + 20 * PAGE, PAGE) == [mapping]
    assert "tearing down invalidated mapping" in caplog.text
    assert mapping.invalidated and gpu.live_mappings() == 0 and t.kernel.live_bos() == 0
    assert maps_lines(guest_ram.name) > 1   # the alias is still there
    gpu.close()
    assert maps_lines(guest_ram.name) == 1


# --- close -----------------------------------------------------------------------------------


@pytest.mark.parametrize("failure", ["kernel", "munmap"])
def test_close_goes_on_past_a_failing_release(guest_ram: GuestRam,
                                              monkeypatch: pytest.MonkeyPatch,
                                              caplog: pytest.LogCaptureFixture,
                                              failure: str) -> None:
    """A release refused by the kernel (HostGpuError) or by munmap (OSError) is logged,
    and close() still closes every fd."""
    before = open_fds()
    gpu, t = sim_gpu("alias")
    mapping = gpu.register_userptr(guest_ram.ranges([2, 9]), readonly=False)
    alias = mapping.private.alias
    assert alias is not None
    if failure == "kernel":
        t.kernel.inject(SimFault("FREE_MEMORY_OF_GPU", errno.EIO))
    else:
        fail_unmap_once(monkeypatch, alias[0])
    try:
        with caplog.at_level(logging.ERROR, logger="vgpu_backend.hostgpu.kfd"):
            gpu.close()
        assert "releasing mapping" in caplog.text
        assert t.kernel.open_files() == []
        assert_no_new_fds(before)
    finally:
        hostmem.unmap(*alias)   # the failed release left it mapped


def test_close_goes_on_past_a_failing_leftover(guest_ram: GuestRam,
                                               caplog: pytest.LogCaptureFixture) -> None:
    """A mapping whose teardown failed at invalidation and fails again at close is
    logged; close() still closes every fd."""
    before = open_fds()
    gpu, t = sim_gpu("batch")
    gpu.register_userptr(guest_ram.ranges([3, 4]), readonly=False)
    t.kernel.inject(SimFault("UNMAP_MEMORY_FROM_GPU", errno.EIO, count=2, device_index=0))
    gpu.invalidate_host_range(guest_ram.base + 3 * PAGE, PAGE)
    with caplog.at_level(logging.ERROR, logger="vgpu_backend.hostgpu.kfd"):
        gpu.close()
    assert "tearing down leftover mapping" in caplog.text
    assert t.kernel.open_files() == []
    assert_no_new_fds(before)


@pytest.mark.parametrize("isolation", ["vm", "context"])
def test_a_closed_host_gpu(make_gpu: MakeGpu, isolation: str) -> None:
    """After close: no memory to report, no page table, and no new context."""
    gpu, _ = make_gpu(isolation=isolation)
    gpu.close()
    assert gpu.available_memory() == {}
    assert gpu.gpu_memory() is None
    with pytest.raises(HostGpuError, match="closed"):
        gpu.open_context(1)


def test_default_page_table_is_the_first_gpus(make_gpu: MakeGpu) -> None:
    """``gpu_memory()`` without a gpu_id is the first selected GPU's."""
    gpu, t = make_gpu(SimKfdConfig(gpu_count=2))
    first, second = (g.gpu_id for g in t.kernel.gpus)
    memory = gpu.gpu_memory()
    assert memory is not None
    assert memory is gpu.gpu_memory(first) and memory is not gpu.gpu_memory(second)
