"""The start-up USERPTR_BATCH probe against both kinds of simulated kernel."""

from __future__ import annotations

import pytest

from protocol.wire import decode
from vgpu_backend.hostgpu import hostmem
from vgpu_backend.hostgpu import kfd_abi as abi
from vgpu_backend.hostgpu.base import HostGpuError, UserptrPath
from vgpu_backend.hostgpu.factory import HostGpuOptions, create_host_gpu
from vgpu_backend.hostgpu.kfd import KfdHostGpu
from vgpu_backend.hostgpu.sim_config import SimKfdConfig
from vgpu_backend.hostgpu.sim_kfd import SimTransport

from .helpers import PAGE, MakeGpu, assert_no_new_fds, open_fds


class ProbeSpy(SimTransport):
    """Records, for every batch ALLOC, the CPU ranges the kernel really registered and
    the first bytes of memory at ``mmap_offset`` at that moment."""

    def __init__(self, config: SimKfdConfig) -> None:
        super().__init__(config)
        self.seen: list[tuple[abi.AllocMemoryOfGpuArgs, list[tuple[int, int]], bytes]] = []

    def ioctl(self, fd: int, request: int, arg: bytearray | None) -> None:
        super().ioctl(fd, request, arg)
        if request == abi.AMDKFD_IOC_ALLOC_MEMORY_OF_GPU and arg is not None:
            out = decode(abi.AllocMemoryOfGpuArgs, arg)
            bo = next(p.bos[out.handle] for p in self.kernel.processes if out.handle in p.bos)
            ranges = list(zip(bo.host_starts.tolist(), bo.host_sizes.tolist(), strict=True))
            self.seen.append((out, ranges, bytes(hostmem.view(ranges[0][0], 24))))


def test_batch_kernel_is_detected(make_gpu: MakeGpu) -> None:
    gpu, t = make_gpu(SimKfdConfig(batch_userptr=True))
    info = gpu.info()
    assert info.batch_supported and info.userptr_path is UserptrPath.BATCH
    assert "mmap_offset 0" in gpu.batch_probe.detail
    assert t.kernel.live_bos() == 0 and t.kernel.userptr_charged == 0


def test_pre_batch_kernel_is_detected_and_the_trap_is_harmless() -> None:
    before = open_fds()
    spy = ProbeSpy(SimKfdConfig(batch_userptr=False))
    gpu = create_host_gpu(HostGpuOptions(gpu="sim"), transport=spy)
    assert isinstance(gpu, KfdHostGpu)
    info = gpu.info()
    assert not info.batch_supported
    assert info.userptr_path is UserptrPath.ALIAS   # auto falls back
    assert "pre-batch" in gpu.batch_probe.detail
    [(args, ranges, head)] = spy.seen
    # the kernel registered exactly the probe's own page: the one holding the list
    assert args.mmap_offset != 0
    assert ranges == [(ranges[0][0], PAGE)] and ranges[0][0] % PAGE == 0
    assert head[:8] == (1).to_bytes(4, "little") + bytes(4)     # num_ranges 1, reserved 0
    assert int.from_bytes(head[16:24], "little") == PAGE          # the range: one page
    assert int.from_bytes(head[8:16], "little") == ranges[0][0] + PAGE  # the next page
    assert spy.kernel.live_bos() == 0
    gpu.close()
    assert_no_new_fds(before)


def test_batch_requested_on_a_pre_batch_kernel_is_refused_at_start() -> None:
    before = open_fds()
    with pytest.raises(HostGpuError, match="does not support USERPTR_BATCH") as exc:
        create_host_gpu(HostGpuOptions(gpu="sim", userptr_path="batch",
                                       sim=SimKfdConfig(batch_userptr=False)))
    assert exc.value.unsupported
    assert_no_new_fds(before)


@pytest.mark.parametrize("path", ["alias", "per-range"])
def test_explicit_fallbacks_are_honoured_on_a_batch_kernel(make_gpu: MakeGpu,
                                                           path: str) -> None:
    gpu, _ = make_gpu(userptr_path=path)
    assert gpu.info().batch_supported
    assert gpu.info().userptr_path is UserptrPath(path)
