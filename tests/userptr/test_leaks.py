"""Leaks.  While the back-end runs: RESOURCE_UNREF gives a blob's GPU range back (the
next blob of the same size gets the same GPU VA: the allocator is first-fit).  At the
end: after sessions that created and destroyed many USERPTR blobs (and left some behind,
mapped in live contexts, with work in flight) the back-end frees everything and exits 0
(70 would mean a host GPU mapping, guest memory or fd was left).

The exit status alone cannot catch a userptr mapping that UNREF forgot: dropping guest
memory at disconnect invalidates, and so tears down, every mapping over guest RAM before
the shutdown check counts them; hence the GPU VA test."""

from __future__ import annotations

import pytest

from protocol.compute import Kernel, buffer_arg, u64_arg
from protocol.virtio_gpu_codes import Resp
from tests.frontend.guest_ram import PAGE_SIZE
from tests.userptr.compute_stream import dispatch
from tests.userptr.fixtures import VmFactory
from tests.userptr.guest_buffer import contiguous_buffer, scattered_buffer
from tests.userptr.vm import Blob, Vm

MiB = 1 << 20
PATHS = {"batch": ("--userptr-host-path", "batch"),
         "alias": ("--userptr-host-path", "alias"),
         "per-range": ("--userptr-host-path", "per-range")}


def churn(vm: Vm, rounds: int, region: int | None = None) -> list[Blob]:
    """Create blobs of every shape (pages in ``region``), mapped in contexts, and unref
    about half of them; return the ones left alive."""
    regions = None if region is None else [region]
    ctx = vm.compute_context(regions=regions)
    alive: list[Blob] = []
    for i in range(rounds):
        buffer = (scattered_buffer(vm.ram, (i % 5 + 1) * PAGE_SIZE, regions=regions) if i % 3
                  else contiguous_buffer(vm.ram, (i % 4 + 1) * PAGE_SIZE, region=region))
        blob = vm.userptr_blob(buffer.size, buffer=buffer, readonly=i % 4 == 1,
                               ctx_id=ctx.ctx_id if i % 2 else 0)
        if blob.ctx_id:
            ctx.map(blob)
        if i % 2 == 0:
            vm.unref(blob.resource_id).expect(Resp.OK_NODATA)
            blob.buffer.free(vm.ram)
        else:
            alive.append(blob)
    return alive


@pytest.mark.parametrize("path", list(PATHS))
def test_unref_gives_the_gpu_range_back(start_vm: VmFactory, path: str) -> None:
    """Create, map and unref blobs of one size, mapped or in no context: every one gets
    the GPU VA the first one had."""
    vm = start_vm(*PATHS[path])
    ctx = vm.compute_context()
    vas = []
    for i in range(12):
        blob = vm.userptr_blob(3 * PAGE_SIZE, ctx_id=ctx.ctx_id if i % 2 else 0)
        if not blob.ctx_id:
            vm.attach(ctx.ctx_id, blob.resource_id).expect(Resp.OK_NODATA)
        vas += ctx.map(blob)
        vm.unref(blob.resource_id).expect(Resp.OK_NODATA)
        blob.buffer.free(vm.ram)
    assert vas == [vas[0]] * len(vas)


@pytest.mark.parametrize("path", list(PATHS))
def test_many_blobs_some_never_unrefd(start_vm: VmFactory, path: str) -> None:
    """40 blobs, 20 unref'd, 20 left mapped in a live context: exit 0."""
    vm = start_vm(*PATHS[path])
    assert len(churn(vm, 40)) == 20
    vm.still_serving()
    assert vm.s.close() == 0


def test_disconnect_with_work_in_flight(start_vm: VmFactory) -> None:
    """QEMU goes away while unfenced jobs of two contexts still read blobs (queued
    behind each other): exit 0, which includes no submission still counted as queued."""
    vm = start_vm()
    for _ in range(2):
        ctx = vm.compute_context()
        blob = ctx.blob(2 * MiB)
        (va,) = ctx.map(blob)
        work = [dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va), u64_arg(2 * MiB))] * 50
        for _ in range(3):
            vm.submit(ctx.ctx_id, work, result=ctx.results, fence=False
                      ).expect(Resp.OK_NODATA)
    assert vm.s.close() == 0


def test_after_invalidations_and_stop(start_vm: VmFactory) -> None:
    """Blobs torn down by REM_MEM_REG, others alive, the rings stopped: exit 0."""
    vm = start_vm(split_at=32 * MiB)
    ctx = vm.compute_context(regions=[0])
    for region in (0, 1, 1, 0):
        ctx.map(ctx.blob(2 * PAGE_SIZE, buffer=scattered_buffer(vm.ram, 2 * PAGE_SIZE,
                                                                   regions=[region])))
    vm.s.remove_region(1)
    churn(vm, 6, region=0)
    vm.s.stop()
    assert vm.s.close() == 0
