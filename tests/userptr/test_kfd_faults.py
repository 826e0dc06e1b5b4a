"""KFD retry, resume and rollback through the whole back-end (``--sim-fault``).

The compute context's result blob (one contiguous run: one ALLOC and one MAP on every
path) is registered first, so the faults skip those calls (``AFTER``) and hit the blob
under test.  "Nothing stays
allocated" is checked twice: the next blob gets the GPU VA the failed one had (the GPU
VA allocator is first-fit, so a leaked range would push it higher, and the simulated
kernel refuses a BO overlapping a leaked one), and the back-end exits 0.
"""

from __future__ import annotations

import zlib

import pytest

from protocol.compute import Kernel, buffer_arg, u64_arg
from protocol.virtio_gpu_codes import Resp
from tests.frontend.guest_ram import PAGE_SIZE
from tests.userptr.compute_stream import dispatch, map_cmd
from tests.userptr.fixtures import VmFactory
from tests.userptr.guest_buffer import GuestBuffer, contiguous_buffer, scattered_buffer
from tests.userptr.vm import ComputeContext, Vm
from vgpu_backend.hostgpu.kfd_process import MAX_ATTEMPTS

RESULTS = 16384
BLOB = 3 * PAGE_SIZE


def fault(ioctl: str, errno: str, count: int = 1, after: int = 0,
          device: int | None = None) -> tuple[str, str]:
    """``--sim-fault IOCTL:ERRNO:COUNT:AFTER[:DEVICE]``."""
    spec = f"{ioctl}:{errno}:{count}:{after}" + ("" if device is None else f":{device}")
    return "--sim-fault", spec


def results_context(vm: Vm) -> ComputeContext:
    """A compute context whose result blob is one contiguous run of pages."""
    return vm.compute_context(RESULTS, buffer=contiguous_buffer(vm.ram, RESULTS))


def usable_at(vm: Vm, ctx: ComputeContext, buffer: GuestBuffer) -> int:
    """Create a userptr blob in ``ctx``; it must read its guest bytes; its GPU VA."""
    blob = ctx.blob(buffer.size, buffer=buffer)
    (va,) = ctx.map(blob)
    done = ctx.run([dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va), u64_arg(buffer.size))])
    done.response.expect(Resp.OK_NODATA)
    assert done.results.values()[0] == zlib.crc32(buffer.read(vm.ram))
    return va


def refused(vm: Vm, ctx: ComputeContext, code: Resp) -> None:
    """The next userptr blob is refused with ``code``; its id stays free."""
    buffer = scattered_buffer(vm.ram, BLOB)
    rid = vm.new_resource_id()
    vm.create_blob(rid, buffer.entries, BLOB, ctx_id=ctx.ctx_id).expect(code)
    vm.attach(ctx.ctx_id, rid).expect(Resp.ERR_INVALID_RESOURCE_ID)
    buffer.free(vm.ram)


def nothing_left(vm: Vm, ctx: ComputeContext) -> None:
    """After a refused blob: the next one takes the GPU VA right after the results blob
    (where the refused one was), works, and the device keeps serving."""
    (results_va,) = ctx.map(ctx.results)
    assert usable_at(vm, ctx, scattered_buffer(vm.ram, BLOB)) == results_va + RESULTS
    vm.still_serving()


@pytest.mark.parametrize("errno", ["EINTR", "EAGAIN"])
@pytest.mark.parametrize("ioctl", ["MAP_MEMORY_TO_GPU", "ALLOC_MEMORY_OF_GPU"])
def test_interrupted_ioctls_are_retried(start_vm: VmFactory, ioctl: str, errno: str) -> None:
    """One less than the retry budget of EINTR/EAGAIN: the blob is created transparently."""
    vm = start_vm(*fault(ioctl, errno, MAX_ATTEMPTS - 1, after=1))
    ctx = results_context(vm)
    (results_va,) = ctx.map(ctx.results)
    assert usable_at(vm, ctx, scattered_buffer(vm.ram, BLOB)) == results_va + RESULTS


def test_endless_eintr_gives_up_and_rolls_back(start_vm: VmFactory) -> None:
    """EINTR on every attempt of a MAP: refused (ERR_UNSPEC), nothing left behind."""
    vm = start_vm(*fault("MAP_MEMORY_TO_GPU", "EINTR", MAX_ATTEMPTS, after=1))
    ctx = results_context(vm)
    refused(vm, ctx, Resp.ERR_UNSPEC)
    nothing_left(vm, ctx)


def test_map_resumes_on_the_second_gpu(start_vm: VmFactory) -> None:
    """EINTR on the second of two GPUs: re-issued from n_success, the blob works."""
    vm = start_vm("--sim-gpus", "2", *fault("MAP_MEMORY_TO_GPU", "EINTR", 3, 1, device=1))
    ctx = results_context(vm)
    (results_va,) = ctx.map(ctx.results)
    assert usable_at(vm, ctx, scattered_buffer(vm.ram, BLOB)) == results_va + RESULTS


@pytest.mark.parametrize("path", ["batch", "alias", "per-range"])
def test_alloc_enomem(start_vm: VmFactory, path: str) -> None:
    """ENOMEM from ALLOC_MEMORY_OF_GPU: ERR_OUT_OF_MEMORY, nothing stays allocated."""
    vm = start_vm("--userptr-host-path", path, *fault("ALLOC_MEMORY_OF_GPU", "ENOMEM",
                                                      after=1))
    ctx = results_context(vm)
    refused(vm, ctx, Resp.ERR_OUT_OF_MEMORY)
    nothing_left(vm, ctx)


def test_per_range_enomem_on_a_later_range(start_vm: VmFactory) -> None:
    """Per-range path, ENOMEM on the third range's ALLOC: the first two BOs (allocated and
    mapped) are rolled back."""
    vm = start_vm("--userptr-host-path", "per-range",
                  *fault("ALLOC_MEMORY_OF_GPU", "ENOMEM", after=1 + 2))
    ctx = results_context(vm)
    refused(vm, ctx, Resp.ERR_OUT_OF_MEMORY)
    nothing_left(vm, ctx)


@pytest.mark.parametrize(("path", "after"), [("batch", 1), ("alias", 1), ("per-range", 1 + 2)])
def test_map_fails_on_the_second_gpu(start_vm: VmFactory, path: str, after: int) -> None:
    """Two GPUs, MAP fails hard on the second (the first succeeded): the first GPU is
    unmapped again, every BO freed, ERR_UNSPEC; the device keeps serving."""
    vm = start_vm("--sim-gpus", "2", "--userptr-host-path", path,
                  *fault("MAP_MEMORY_TO_GPU", "EIO", 1, after, device=1))
    ctx = results_context(vm)
    refused(vm, ctx, Resp.ERR_UNSPEC)
    nothing_left(vm, ctx)


@pytest.mark.parametrize("errno", ["EINTR", "EAGAIN"])
@pytest.mark.parametrize("ioctl", ["UNMAP_MEMORY_FROM_GPU", "FREE_MEMORY_OF_GPU"])
def test_unref_retries_teardown(start_vm: VmFactory, ioctl: str, errno: str) -> None:
    """EINTR/EAGAIN while RESOURCE_UNREF tears a blob down: retried, UNREF succeeds, the
    GPU VA is free again and the back-end exits 0."""
    vm = start_vm("--sim-gpus", "2", *fault(ioctl, errno, 5))
    ctx = results_context(vm)
    (results_va,) = ctx.map(ctx.results)
    blob = ctx.blob(BLOB)
    (va,) = ctx.map(blob)
    assert va == results_va + RESULTS
    vm.unref(blob.resource_id).expect(Resp.OK_NODATA)
    assert usable_at(vm, ctx, scattered_buffer(vm.ram, BLOB)) == va


def test_device_keeps_serving_after_many_failures(start_vm: VmFactory) -> None:
    """Ten refused blobs in a row (ENOMEM), then everything works."""
    vm = start_vm(*fault("ALLOC_MEMORY_OF_GPU", "ENOMEM", 10, after=1))
    ctx = results_context(vm)
    for _ in range(10):
        refused(vm, ctx, Resp.ERR_OUT_OF_MEMORY)
    nothing_left(vm, ctx)


@pytest.mark.parametrize("gpus", [1, 2])
def test_unref_refused_while_the_host_cannot_unmap(start_vm: VmFactory, gpus: int) -> None:
    """UNMAP fails hard (EIO, on the last GPU) during RESOURCE_UNREF: the mapping is
    still live, so the UNREF is refused (ERR_UNSPEC) and the resource stays; no context
    can map it meanwhile; a retried UNREF tears it down and the back-end exits 0."""
    vm = start_vm("--sim-gpus", str(gpus),
                  *fault("UNMAP_MEMORY_FROM_GPU", "EIO", 1, 0, device=gpus - 1))
    ctx = results_context(vm)
    blob = ctx.blob(BLOB)
    vm.unref(blob.resource_id).expect(Resp.ERR_UNSPEC)
    again = ctx.run([map_cmd(blob.resource_id, 1)])
    again.response.expect(Resp.ERR_INVALID_PARAMETER)
    vm.unref(blob.resource_id).expect(Resp.OK_NODATA)
    vm.unref(blob.resource_id).expect(Resp.ERR_INVALID_RESOURCE_ID)
    vm.still_serving()


def test_detach_backing_refused_while_the_host_cannot_unmap(start_vm: VmFactory) -> None:
    """The same for DETACH_BACKING: refused while the mapping is live (the backing
    stays), so a later UNREF cannot answer OK over a live mapping; retries succeed."""
    vm = start_vm(*fault("UNMAP_MEMORY_FROM_GPU", "EIO", 1, 0, device=0))
    ctx = results_context(vm)
    blob = ctx.blob(BLOB)
    vm.s.gpu.detach_backing(blob.resource_id).expect(Resp.ERR_UNSPEC)
    vm.s.gpu.detach_backing(blob.resource_id).expect(Resp.OK_NODATA)
    vm.unref(blob.resource_id).expect(Resp.OK_NODATA)
    vm.still_serving()
