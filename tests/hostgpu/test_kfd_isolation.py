"""Context isolation: a secondary KFD process per context, and no USERPTR there."""

from __future__ import annotations

import errno

import pytest

from vgpu_backend.hostgpu.base import HostGpuError
from vgpu_backend.hostgpu.factory import HostGpuOptions, create_host_gpu
from vgpu_backend.hostgpu.kfd import CONTEXT_USERPTR_UNSUPPORTED
from vgpu_backend.hostgpu.sim_config import SimKfdConfig

from .helpers import GuestRam, MakeGpu, open_fds


def test_context_isolation_has_no_userptr(make_gpu: MakeGpu, guest_ram: GuestRam) -> None:
    gpu, t = make_gpu(SimKfdConfig(gpu_count=2, kfd_minor=19), isolation="context")
    info = gpu.info()
    assert info.isolation == "context"
    assert not info.userptr_available and not info.batch_supported
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
    with pytest.raises(HostGpuError, match=r"needs AMDKFD_IOC_CREATE_PROCESS.*1\.18"):
        create_host_gpu(HostGpuOptions(gpu="sim", isolation="context",
                                       sim=SimKfdConfig(kfd_minor=18)))
    assert open_fds() == before


def test_vm_isolation_ignores_contexts(make_gpu: MakeGpu, guest_ram: GuestRam) -> None:
    gpu, t = make_gpu(SimKfdConfig(kfd_minor=18))
    gpu.open_context(3)
    assert len(t.kernel.processes) == 1
    mapping = gpu.register_userptr(guest_ram.ranges([4]), readonly=False, context=3)
    assert mapping.context == 3
    gpu.close_context(3)   # one KFD process: the mapping outlives the context
    assert gpu.live_mappings() == 1 and t.kernel.live_bos() == 1
    gpu.release(mapping)
    assert gpu.live_mappings() == 0 and t.kernel.live_bos() == 0
