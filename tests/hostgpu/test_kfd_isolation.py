"""Context isolation: a secondary KFD process per context, and no USERPTR there."""

from __future__ import annotations

import errno
import logging

import pytest

from vgpu_backend.hostgpu import kfd_abi as abi
from vgpu_backend.hostgpu.base import HostGpuError, UserptrPath
from vgpu_backend.hostgpu.factory import HostGpuOptions, create_host_gpu
from vgpu_backend.hostgpu.kfd import CONTEXT_USERPTR_UNSUPPORTED
from vgpu_backend.hostgpu.sim_config import SimFault, SimKfdConfig
from vgpu_backend.hostgpu.sim_kfd import CONTEXT_ID_PRIMARY, SimKfd, SimTransport

from .helpers import GuestRam, MakeGpu, fail_unmap_once, maps_lines, open_fds


class SecondaryUserptrKfd(SimKfd):
    """A kernel that, unlike today's, accepts USERPTR allocations on secondary KFD
    processes (the start-up probe then makes USERPTR available per context)."""

    def ioctl(self, fd: int, request: int, arg: bytearray | None) -> None:
        f = self.files.get(fd)
        proc = f.process if f is not None else None
        if request != abi.AMDKFD_IOC_ALLOC_MEMORY_OF_GPU or proc is None or proc.primary:
            super().ioctl(fd, request, arg)
            return
        context_id, proc.context_id = proc.context_id, CONTEXT_ID_PRIMARY
        try:
            super().ioctl(fd, request, arg)
        finally:
            proc.context_id = context_id


def secondary_userptr(gpus: int = 1) -> SimTransport:
    """A sim transport onto :class:`SecondaryUserptrKfd`."""
    return SimTransport(SecondaryUserptrKfd(SimKfdConfig(gpu_count=gpus)))


def test_context_isolation_has_no_userptr(make_gpu: MakeGpu, guest_ram: GuestRam) -> None:
    gpu, t = make_gpu(SimKfdConfig(gpu_count=2, kfd_minor=19), isolation="context")
    info = gpu.info()
    assert info.isolation == "context"
    assert not info.userptr_available and not info.batch_supported
    assert gpu.batch_probe.detail == "not probed: USERPTR refused on a secondary KFD process"
    assert "ALLOC_MEMORY_OF_GPU" in gpu.userptr_detail
    kernel = t.kernel
    assert len(kernel.processes) == 1  # the probe's secondary process is gone again
    gpu.open_context(7)
    gpu.open_context(8)
    secondaries = [p for p in kernel.processes if not p.primary]
    assert len(secondaries) == 2
    assert all(pdd.vm is not None for p in secondaries for pdd in p.pdds.values())
    with pytest.raises(HostGpuError, match="already has"):
        gpu.open_context(7)
    for context in (7, None):
        with pytest.raises(HostGpuError) as exc:
            gpu.register_userptr(guest_ram.ranges([1, 2]), readonly=False, context=context)
        assert exc.value.unsupported
        assert exc.value.errno == errno.EOPNOTSUPP
        assert str(exc.value) == CONTEXT_USERPTR_UNSUPPORTED
    assert "EOPNOTSUPP" in CONTEXT_USERPTR_UNSUPPORTED
    assert gpu.gpu_memory() is None
    gpu.close_context(7)
    assert len([p for p in kernel.processes if not p.primary]) == 1
    gpu.close_context(7)  # unknown: nothing to do


def test_context_isolation_needs_kfd_1_19() -> None:
    before = open_fds()
    with pytest.raises(HostGpuError, match=r"needs AMDKFD_IOC_CREATE_PROCESS.*1\.18") as exc:
        create_host_gpu(HostGpuOptions(gpu="sim", isolation="context",
                                       sim=SimKfdConfig(kfd_minor=18)))
    assert exc.value.unsupported
    assert open_fds() == before


def test_vm_isolation_ignores_contexts(make_gpu: MakeGpu, guest_ram: GuestRam) -> None:
    gpu, t = make_gpu(SimKfdConfig(kfd_minor=18))
    assert gpu.info().kfd_version == (1, 18)
    gpu.open_context(3)
    assert len(t.kernel.processes) == 1
    mapping = gpu.register_userptr(guest_ram.ranges([4]), readonly=False, context=3)
    assert mapping.context == 3
    gpu.close_context(3)   # one KFD process: the mapping outlives the context
    assert gpu.live_mappings() == 1 and t.kernel.live_bos() == 1
    gpu.release(mapping)
    assert gpu.live_mappings() == 0 and t.kernel.live_bos() == 0


# --- a kernel with USERPTR on secondary processes ----------------------------------------


def test_context_userptr_where_the_kernel_allows_it(make_gpu: MakeGpu,
                                                    guest_ram: GuestRam) -> None:
    """Each context registers in its own KFD process; none without a context or an
    opened one; closing a context releases its mappings only, and its id can be reused."""
    gpu, t = make_gpu(transport=secondary_userptr(2), isolation="context")
    info = gpu.info()
    assert info.userptr_available and info.userptr_path is UserptrPath.ALIAS
    assert gpu.batch_probe.detail == "not probed: context isolation"
    assert gpu.userptr_detail == "plain USERPTR allocation accepted"
    gpu.open_context(7)
    gpu.open_context(8)
    seven = gpu.register_userptr(guest_ram.ranges([1, 5]), readonly=False, context=7)
    eight = gpu.register_userptr(guest_ram.ranges([2, 9]), readonly=False, context=8)
    assert (seven.context, eight.context) == (7, 8)
    assert seven.private.process is not eight.private.process
    assert [len(p.bos) for p in t.kernel.processes if not p.primary] == [1, 1]
    with pytest.raises(HostGpuError) as exc:
        gpu.register_userptr(guest_ram.ranges([3]), readonly=False)
    assert exc.value.unsupported and exc.value.errno == errno.EOPNOTSUPP
    assert str(exc.value) == CONTEXT_USERPTR_UNSUPPORTED
    with pytest.raises(HostGpuError, match="context 9 has no KFD process") as exc:
        gpu.register_userptr(guest_ram.ranges([3]), readonly=False, context=9)
    assert not exc.value.unsupported
    gpu.close_context(7)
    assert seven.invalidated and not eight.invalidated
    assert gpu.live_mappings() == 1 and t.kernel.live_bos() == 1
    gpu.open_context(7)
    gpu.release(gpu.register_userptr(guest_ram.ranges([4]), readonly=False, context=7))


def test_refusals_in_a_context_process(make_gpu: MakeGpu, guest_ram: GuestRam) -> None:
    """EOPNOTSUPP from a secondary process is the context-isolation refusal; any other
    errno is passed on as it is; nothing stays allocated either way."""
    gpu, t = make_gpu(transport=secondary_userptr(), isolation="context")
    gpu.open_context(1)
    t.kernel.inject(SimFault("ALLOC_MEMORY_OF_GPU", errno.ENOMEM))
    with pytest.raises(HostGpuError, match="ALLOC_MEMORY_OF_GPU") as exc:
        gpu.register_userptr(guest_ram.ranges([3]), readonly=False, context=1)
    assert exc.value.errno == errno.ENOMEM and not exc.value.unsupported
    t.kernel.inject(SimFault("ALLOC_MEMORY_OF_GPU", errno.EOPNOTSUPP))
    with pytest.raises(HostGpuError) as exc:
        gpu.register_userptr(guest_ram.ranges([3]), readonly=False, context=1)
    assert exc.value.errno == errno.EOPNOTSUPP and exc.value.unsupported
    assert str(exc.value) == CONTEXT_USERPTR_UNSUPPORTED
    assert gpu.live_mappings() == 0 and t.kernel.live_bos() == 0
    assert len(gpu._contexts[1].va) == 0


@pytest.mark.parametrize("failure", ["kernel", "munmap"])
def test_close_context_finishes_despite_a_failing_release(
        make_gpu: MakeGpu, guest_ram: GuestRam, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch, failure: str) -> None:
    """A release refused by the kernel (HostGpuError) or by munmap (OSError) while its
    context closes is logged; the context's KFD process is closed all the same (its BOs
    die with it) and close() unmaps the alias that was left."""
    gpu, t = make_gpu(transport=secondary_userptr(), isolation="context")
    gpu.open_context(7)
    mapping = gpu.register_userptr(guest_ram.ranges([1, 5]), readonly=False, context=7)
    assert mapping.path is UserptrPath.ALIAS
    if failure == "kernel":
        t.kernel.inject(SimFault("FREE_MEMORY_OF_GPU", errno.EIO))
    else:
        fail_unmap_once(monkeypatch, mapping.private.alias[0])
    with caplog.at_level(logging.ERROR, logger="vgpu_backend.hostgpu.kfd"):
        gpu.close_context(7)
    assert "context 7" in caplog.text
    assert mapping.invalidated and gpu.live_mappings() == 0
    assert [p for p in t.kernel.processes if not p.primary] == []
    assert len(t.kernel.open_files()) == 1   # the control /dev/kfd only
    gpu.close()
    assert maps_lines(guest_ram.name) == 1


def test_close_with_a_context_whose_release_keeps_failing(guest_ram: GuestRam) -> None:
    """close() closes the contexts first: a context mapping whose release the kernel
    refuses still lets every fd close."""
    before = open_fds()
    t = secondary_userptr()
    gpu = create_host_gpu(HostGpuOptions(gpu="sim", isolation="context"), transport=t)
    gpu.open_context(7)
    gpu.register_userptr(guest_ram.ranges([1, 5]), readonly=False, context=7)
    t.kernel.inject(SimFault("FREE_MEMORY_OF_GPU", errno.EIO, count=1))
    gpu.close()
    assert t.kernel.open_files() == [] and t.kernel.live_bos() == 0
    assert open_fds() == before
    assert maps_lines(guest_ram.name) == 1
