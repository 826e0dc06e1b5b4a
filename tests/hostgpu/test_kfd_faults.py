"""The driver under injected kernel faults: EINTR/EAGAIN retries with the same struct,
n_success resume, rollback of a hard failure on the k-th GPU, ENOMEM, failed teardown."""

from __future__ import annotations

import errno

import pytest

from protocol.wire import decode
from vgpu_backend.hostgpu import kfd_abi as abi
from vgpu_backend.hostgpu.base import GpuFault, HostGpuError
from vgpu_backend.hostgpu.factory import HostGpuOptions, create_host_gpu
from vgpu_backend.hostgpu.kfd import KfdHostGpu
from vgpu_backend.hostgpu.kfd_process import MAX_ATTEMPTS
from vgpu_backend.hostgpu.sim_config import SimFault, SimKfdConfig
from vgpu_backend.hostgpu.sim_kfd import SimTransport

from .helpers import PAGE, GuestRam, MakeGpu, assert_no_new_fds, maps_lines, open_fds, read_runs

PATHS = ["batch", "alias", "per-range"]


class RecordingTransport(SimTransport):
    """Records every ioctl's request and argument bytes as passed in."""

    def __init__(self, config: SimKfdConfig) -> None:
        super().__init__(config)
        self.calls: list[tuple[int, bytes]] = []

    def ioctl(self, fd: int, request: int, arg: bytearray | None) -> None:
        self.calls.append((request, bytes(arg or b"")))
        super().ioctl(fd, request, arg)

    def maps(self) -> list[abi.MapMemoryToGpuArgs]:
        return [decode(abi.MapMemoryToGpuArgs, a) for r, a in self.calls
                if r == abi.AMDKFD_IOC_MAP_MEMORY_TO_GPU]


def assert_nothing_left(gpu: KfdHostGpu, transport: SimTransport) -> None:
    assert gpu.live_mappings() == 0
    assert transport.kernel.live_bos() == 0
    assert transport.kernel.userptr_charged == 0
    assert gpu._main is not None
    for g in transport.kernel.gpus:
        vm = transport.kernel.vm_of(gpu._main.fd, g.gpu_id)
        assert vm is None or len(vm) == 0
    assert len(gpu._main.va) == 0


@pytest.mark.parametrize("path", PATHS)
def test_eintr_after_mapping_is_reissued_with_the_same_struct(
        guest_ram: GuestRam, path: str) -> None:
    before = open_fds()
    t = RecordingTransport(SimKfdConfig(gpu_count=2))
    gpu = create_host_gpu(HostGpuOptions(gpu="sim", userptr_path=path), transport=t)
    assert isinstance(gpu, KfdHostGpu) and gpu._main is not None
    t.kernel.inject(SimFault("MAP_MEMORY_TO_GPU", errno.EINTR))
    t.kernel.inject(SimFault("ALLOC_MEMORY_OF_GPU", errno.EAGAIN, count=2))
    t.calls.clear()
    ranges = guest_ram.ranges([3, 9])
    mapping = gpu.register_userptr(ranges, readonly=False)
    maps = t.maps()
    # first MAP from n_success 0, interrupted after both GPUs; the re-issue carries 2
    assert [m.n_success for m in maps[:2]] == [0, 2]
    assert maps[0].handle == maps[1].handle
    allocs = [a for r, a in t.calls if r == abi.AMDKFD_IOC_ALLOC_MEMORY_OF_GPU]
    assert allocs[0] == allocs[1] == allocs[2]  # EAGAIN, EAGAIN, then success: same bytes
    assert gpu._main.retries == 3
    memory = gpu.gpu_memory()
    assert memory is not None
    assert read_runs(memory.resolve(mapping.gpu_va, 2 * PAGE, write=True)) == \
        guest_ram.file_bytes(ranges)
    gpu.release(mapping)
    gpu.close()
    assert_no_new_fds(before)


def test_eintr_on_a_middle_gpu_resumes_from_n_success(guest_ram: GuestRam) -> None:
    t = RecordingTransport(SimKfdConfig(gpu_count=3))
    gpu = create_host_gpu(HostGpuOptions(gpu="sim", userptr_path="batch"), transport=t)
    t.kernel.inject(SimFault("MAP_MEMORY_TO_GPU", errno.EINTR, device_index=2))
    t.calls.clear()
    mapping = gpu.register_userptr(guest_ram.ranges([1]), readonly=False)
    assert [m.n_success for m in t.maps()] == [0, 2]  # resumed at the third GPU
    for gpu_id in mapping.gpu_ids:
        memory = gpu.gpu_memory(gpu_id)
        assert memory is not None
        assert memory.resolve(mapping.gpu_va, PAGE, write=True) == [(guest_ram.base + PAGE,
                                                                     PAGE)]
    gpu.close()


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("failing_gpu", [0, 1, 2])
def test_hard_failure_on_kth_gpu_rolls_back(make_gpu: MakeGpu, guest_ram: GuestRam,
                                            path: str, failing_gpu: int) -> None:
    gpu, t = make_gpu(SimKfdConfig(gpu_count=3), userptr_path=path)
    t.kernel.inject(SimFault("MAP_MEMORY_TO_GPU", errno.ENOMEM, device_index=failing_gpu))
    with pytest.raises(HostGpuError, match=f"after {failing_gpu} of 3 GPUs") as exc:
        gpu.register_userptr(guest_ram.ranges([4, 40, 41]), readonly=False)
    assert exc.value.errno == errno.ENOMEM
    assert_nothing_left(gpu, t)
    assert maps_lines(guest_ram.name) == 1
    for g in t.kernel.gpus:
        memory = gpu.gpu_memory(g.gpu_id)
        assert memory is not None
        with pytest.raises(GpuFault):
            memory.resolve(t.kernel.gpus[0].gpuvm_base, PAGE, write=False)
    # the device keeps working afterwards
    mapping = gpu.register_userptr(guest_ram.ranges([4]), readonly=False)
    gpu.release(mapping)


def test_per_range_failure_midway_frees_the_earlier_ranges(make_gpu: MakeGpu,
                                                           guest_ram: GuestRam) -> None:
    gpu, t = make_gpu(SimKfdConfig(gpu_count=2), userptr_path="per-range")
    t.kernel.inject(SimFault("ALLOC_MEMORY_OF_GPU", errno.ENOMEM, after=3))
    with pytest.raises(HostGpuError) as exc:
        gpu.register_userptr(guest_ram.ranges([1, 3, 5, 7, 9, 11]), readonly=False)
    assert exc.value.errno == errno.ENOMEM
    assert_nothing_left(gpu, t)
    t.kernel.inject(SimFault("MAP_MEMORY_TO_GPU", errno.EIO, after=4, device_index=1))
    with pytest.raises(HostGpuError) as exc:
        gpu.register_userptr(guest_ram.ranges([1, 3, 5, 7, 9, 11]), readonly=False)
    assert exc.value.errno == errno.EIO
    assert_nothing_left(gpu, t)


@pytest.mark.parametrize("path", PATHS)
def test_enomem_on_alloc(make_gpu: MakeGpu, guest_ram: GuestRam, path: str) -> None:
    gpu, t = make_gpu(userptr_path=path)
    t.kernel.inject(SimFault("ALLOC_MEMORY_OF_GPU", errno.ENOMEM))
    with pytest.raises(HostGpuError, match="ALLOC_MEMORY_OF_GPU") as exc:
        gpu.register_userptr(guest_ram.ranges([2, 6]), readonly=False)
    assert exc.value.errno == errno.ENOMEM and not exc.value.unsupported
    assert_nothing_left(gpu, t)
    assert maps_lines(guest_ram.name) == 1


def test_memory_limit_is_enomem(make_gpu: MakeGpu, guest_ram: GuestRam) -> None:
    gpu, _ = make_gpu(SimKfdConfig(userptr_limit=8 * PAGE), userptr_path="batch")
    kept = gpu.register_userptr(guest_ram.ranges([0], [6]), readonly=False)
    with pytest.raises(HostGpuError) as exc:
        gpu.register_userptr(guest_ram.ranges([10], [3]), readonly=False)
    assert exc.value.errno == errno.ENOMEM
    gpu.release(kept)
    gpu.release(gpu.register_userptr(guest_ram.ranges([10], [3]), readonly=False))


def test_endless_eintr_gives_up(make_gpu: MakeGpu, guest_ram: GuestRam) -> None:
    gpu, t = make_gpu(userptr_path="batch")
    t.kernel.inject(SimFault("ALLOC_MEMORY_OF_GPU", errno.EINTR, count=MAX_ATTEMPTS))
    with pytest.raises(HostGpuError) as exc:
        gpu.register_userptr(guest_ram.ranges([2]), readonly=False)
    assert exc.value.errno == errno.EINTR
    assert_nothing_left(gpu, t)


def test_failed_release_keeps_the_mapping_and_can_be_retried(make_gpu: MakeGpu,
                                                             guest_ram: GuestRam) -> None:
    gpu, t = make_gpu(SimKfdConfig(gpu_count=2), userptr_path="per-range")
    mapping = gpu.register_userptr(guest_ram.ranges([1, 5, 9]), readonly=False)
    t.kernel.inject(SimFault("FREE_MEMORY_OF_GPU", errno.EIO, after=1))
    with pytest.raises(HostGpuError) as exc:
        gpu.release(mapping)
    assert exc.value.errno == errno.EIO
    assert gpu.live_mappings() == 1
    assert t.kernel.live_bos() == 2   # one range was freed before the failure
    gpu.release(mapping)
    assert_nothing_left(gpu, t)


def test_failed_teardown_after_invalidation_is_finished_at_close(
        guest_ram: GuestRam) -> None:
    before = open_fds()
    t = SimTransport(SimKfdConfig())
    gpu = create_host_gpu(HostGpuOptions(gpu="sim", userptr_path="alias"), transport=t)
    mapping = gpu.register_userptr(guest_ram.ranges([7, 8, 20]), readonly=False)
    t.kernel.inject(SimFault("UNMAP_MEMORY_FROM_GPU", errno.EIO, device_index=0))
    assert gpu.invalidate_host_range(guest_ram.base + 20 * PAGE, PAGE) == [mapping]
    assert mapping.invalidated and gpu.live_mappings() == 0
    assert t.kernel.live_bos() == 1          # the kernel refused; it is kept for close()
    gpu.close()
    assert t.kernel.live_bos() == 0
    assert maps_lines(guest_ram.name) == 1
    assert_no_new_fds(before)


def test_unmap_failing_after_every_gpu_resumes_at_n_success(make_gpu: MakeGpu,
                                                            guest_ram: GuestRam) -> None:
    """A hard error after all GPUs were unmapped (the final wait) must not make the retry
    unmap again (EINVAL: not mapped); a failure on GPU 1 resumes there."""
    gpu, t = make_gpu(SimKfdConfig(gpu_count=2), userptr_path="batch")
    mapping = gpu.register_userptr(guest_ram.ranges([3, 4]), readonly=False)
    t.kernel.inject(SimFault("UNMAP_MEMORY_FROM_GPU", errno.EIO, device_index=1))
    with pytest.raises(HostGpuError, match="unmapped from 1 of 2 GPUs"):
        gpu.release(mapping)
    assert mapping.private.unmapped_on == {mapping.private.handles[0]: 1}
    t.kernel.inject(SimFault("UNMAP_MEMORY_FROM_GPU", errno.EIO))
    gpu.release(mapping)   # the resumed unmap finishes GPU 1, then fails its final wait
    assert_nothing_left(gpu, t)
