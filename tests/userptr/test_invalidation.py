"""Guest memory changing under USERPTR blobs (REM_MEM_REG, SET_MEM_TABLE replacement,
device reset, RESET_OWNER, DETACH_BACKING): the host mapping is torn down, later use of
the blob is an error, and the back-end keeps serving and exits 0."""

from __future__ import annotations

import zlib
from dataclasses import replace

import pytest

from protocol.compute import Kernel, Status, buffer_arg, u64_arg
from protocol.vhost_user import FrontendReq, ProtocolFeature
from protocol.virtio_gpu_codes import BlobMem, Format, Resp
from tests.frontend import gpu_commands as cmds
from tests.frontend.guest_ram import PAGE_SIZE
from tests.userptr import guest_commands as gc
from tests.userptr.compute_stream import dispatch, map_cmd
from tests.userptr.fixtures import VmFactory
from tests.userptr.guest_buffer import scattered_buffer
from tests.userptr.vm import Blob, ComputeContext, Vm

MiB = 1 << 20
BLOB_BYTES = 4 * PAGE_SIZE


def checksum_cmd(va: int, nbytes: int) -> bytes:
    """DISPATCH CHECKSUM_CRC32 over ``[va, va+nbytes)``."""
    return dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va), u64_arg(nbytes))


def assert_usable(vm: Vm, ctx: ComputeContext, blob: Blob) -> int:
    """The blob maps in ``ctx`` and reads its guest bytes; returns its GPU VA."""
    (va,) = ctx.map(blob)
    done = ctx.run([checksum_cmd(va, blob.buffer.size)])
    done.response.expect(Resp.OK_NODATA)
    assert done.results.values()[0] == zlib.crc32(blob.buffer.read(vm.ram))
    return va


def assert_torn_down(vm: Vm, ctx: ComputeContext, blob: Blob, old_va: int) -> None:
    """The old GPU VA faults in the context that mapped it, MAP_RESOURCE refuses the
    blob, and it cannot be a framebuffer any more."""
    done = ctx.run([checksum_cmd(old_va, PAGE_SIZE)])
    done.response.expect(Resp.ERR_UNSPEC)
    assert done.results.status == Status.FAULT
    assert done.results.header.fault_address == old_va
    again = ctx.run([map_cmd(blob.resource_id)])
    again.response.expect(Resp.ERR_INVALID_PARAMETER)
    assert again.results.statuses() == [Status.INVALID_RESOURCE]
    vm.run(gc.set_scanout_blob(0, blob.resource_id, fmt=Format.B8G8R8X8_UNORM, fb_width=16,
                               fb_height=16, stride=64)).expect(Resp.ERR_UNSPEC)


def test_rem_mem_reg_invalidates_blobs_in_that_region(start_vm: VmFactory) -> None:
    """REM_MEM_REG of the high region: blobs there are torn down, blobs below are not;
    after ADD_MEM_REG new blobs work there, the old one stays dead."""
    vm = start_vm(split_at=32 * MiB)
    ctx = vm.compute_context(regions=[0])
    high = ctx.blob(BLOB_BYTES, buffer=scattered_buffer(vm.ram, BLOB_BYTES, regions=[1]))
    low = ctx.blob(BLOB_BYTES, buffer=scattered_buffer(vm.ram, BLOB_BYTES, regions=[0]))
    high_va = assert_usable(vm, ctx, high)
    assert_usable(vm, ctx, low)
    vm.s.remove_region(1)
    assert_torn_down(vm, ctx, high, high_va)
    assert_usable(vm, ctx, low)
    vm.still_serving()
    vm.s.send_memory()  # ADD_MEM_REG of the region again
    assert_torn_down(vm, ctx, high, high_va)
    fresh = ctx.blob(BLOB_BYTES, buffer=scattered_buffer(vm.ram, BLOB_BYTES, regions=[1]))
    assert_usable(vm, ctx, fresh)
    vm.unref(high.resource_id).expect(Resp.OK_NODATA)


@pytest.mark.parametrize("how", ["REM_MEM_REG", "DETACH_BACKING"])
def test_invalidated_range_does_not_alias_a_new_blob(start_vm: VmFactory, how: str) -> None:
    """After the invalidation the context that had the blob mapped still faults at its
    old VA once an unrelated, unattached blob took that GPU VA.  (The invalidated range
    once stayed in the context's mappings: the context read the other blob.)"""
    vm = start_vm(split_at=32 * MiB)
    ctx = vm.compute_context(regions=[0])
    high = ctx.blob(BLOB_BYTES, buffer=scattered_buffer(vm.ram, BLOB_BYTES, regions=[1]))
    va = assert_usable(vm, ctx, high)
    if how == "REM_MEM_REG":
        vm.s.remove_region(1)
    else:
        vm.s.gpu.detach_backing(high.resource_id).expect(Resp.OK_NODATA)
    other = vm.userptr_blob(BLOB_BYTES, buffer=scattered_buffer(vm.ram, BLOB_BYTES,
                                                                regions=[0]))
    done = ctx.run([checksum_cmd(va, BLOB_BYTES)])
    read_other = done.results.values()[0] == zlib.crc32(other.buffer.read(vm.ram))
    assert done.results.status == Status.FAULT, (
        f"status {done.results.status.name}; read the unattached blob's pages: {read_other}")


def test_rem_mem_reg_waits_for_work_in_flight(start_vm: VmFactory) -> None:
    """REM_MEM_REG while a job reads a blob in that region: the job runs to its end on
    valid memory before the region goes (the ack comes after it)."""
    vm = start_vm(split_at=32 * MiB)
    ctx = vm.compute_context(regions=[0])
    nbytes = 2 * MiB
    blob = ctx.blob(nbytes, buffer=scattered_buffer(vm.ram, nbytes, regions=[1]))
    (va,) = ctx.map(blob)
    want = zlib.crc32(blob.buffer.read(vm.ram))
    work = [checksum_cmd(va, nbytes)] * 40
    vm.poison_results(ctx.results, len(work))
    vm.submit(ctx.ctx_id, work, result=ctx.results, fence=False).expect(Resp.OK_NODATA)
    vm.s.remove_region(1)
    results = vm.results(ctx.results, len(work))
    assert results.status == Status.OK
    assert results.header.completed == len(work)
    assert set(results.values()) == {want}
    vm.still_serving()


def mem_tables_sent(vm: Vm) -> int:
    """SET_MEM_TABLE requests sent so far."""
    return [m.name for m in vm.s.frontend.log if m.direction == "Q->B"].count("SET_MEM_TABLE")


def test_set_mem_table_replacement_invalidates(start_vm: VmFactory) -> None:
    """Without CONFIGURE_MEM_SLOTS: a SET_MEM_TABLE in which the high region changed (QEMU
    maps it elsewhere) tears down the blobs in it and keeps the others; new blobs work
    in the new region; a table without the region drops it (and its new blobs)."""
    vm = start_vm(refuse_protocol=int(ProtocolFeature.CONFIGURE_MEM_SLOTS),
                  split_at=32 * MiB)
    ctx = vm.compute_context(regions=[0])
    high = ctx.blob(BLOB_BYTES, buffer=scattered_buffer(vm.ram, BLOB_BYTES, regions=[1]))
    low = ctx.blob(BLOB_BYTES, buffer=scattered_buffer(vm.ram, BLOB_BYTES, regions=[0]))
    high_va = assert_usable(vm, ctx, high)
    assert_usable(vm, ctx, low)
    low_region, high_region = vm.ram.regions
    moved = replace(high_region, userspace_addr=high_region.userspace_addr + (1 << 36))
    vm.s.frontend.set_mem_table([low_region, moved], vm.ram.fd)
    assert mem_tables_sent(vm) == 2
    assert_torn_down(vm, ctx, high, high_va)
    assert_usable(vm, ctx, low)
    fresh = ctx.blob(BLOB_BYTES, buffer=scattered_buffer(vm.ram, BLOB_BYTES, regions=[1]))
    fresh_va = assert_usable(vm, ctx, fresh)
    vm.s.frontend.set_mem_table([low_region], vm.ram.fd)
    assert_torn_down(vm, ctx, fresh, fresh_va)
    assert_usable(vm, ctx, low)
    vm.still_serving()


def test_identical_set_mem_table_keeps_blobs(start_vm: VmFactory) -> None:
    """QEMU re-sends the same table at every start (VM stop/cont): nothing is torn down."""
    vm = start_vm(refuse_protocol=int(ProtocolFeature.CONFIGURE_MEM_SLOTS),
                  split_at=32 * MiB)
    ctx = vm.compute_context()
    blob = ctx.blob(BLOB_BYTES, buffer=scattered_buffer(vm.ram, BLOB_BYTES, regions=[0, 1]))
    va = assert_usable(vm, ctx, blob)
    vm.s.send_memory()
    vm.s.stop()
    vm.s.cont()
    assert mem_tables_sent(vm) == 3
    assert assert_usable(vm, ctx, blob) == va


def test_detach_backing_invalidates(vm: Vm) -> None:
    """DETACH_BACKING of a userptr blob tears its mapping down.  ATTACH_BACKING cannot
    revive it, and says so (it answered OK and left the blob dead); UNREF still works."""
    ctx = vm.compute_context()
    blob = ctx.blob(BLOB_BYTES)
    va = assert_usable(vm, ctx, blob)
    vm.s.gpu.detach_backing(blob.resource_id).expect(Resp.OK_NODATA)
    assert_torn_down(vm, ctx, blob, va)
    vm.s.gpu.attach_backing(blob.resource_id, blob.buffer.entries).expect(Resp.ERR_UNSPEC)
    assert ctx.run([map_cmd(blob.resource_id)]).results.statuses() == [Status.INVALID_RESOURCE]
    vm.unref(blob.resource_id).expect(Resp.OK_NODATA)
    vm.still_serving()


def test_a_userptr_blob_whose_memory_went_refuses_attach(start_vm: VmFactory) -> None:
    """After REM_MEM_REG took a userptr blob's memory, ATTACH_BACKING of other pages is
    refused too (the host GPU mapping is not redone)."""
    vm = start_vm(split_at=32 * MiB)
    blob = vm.userptr_blob(BLOB_BYTES, buffer=scattered_buffer(vm.ram, BLOB_BYTES,
                                                               regions=[1]))
    vm.s.remove_region(1)
    elsewhere = scattered_buffer(vm.ram, BLOB_BYTES, regions=[0])
    vm.s.gpu.attach_backing(blob.resource_id, elsewhere.entries).expect(Resp.ERR_UNSPEC)
    vm.unref(blob.resource_id).expect(Resp.OK_NODATA)
    vm.still_serving()


def test_invalidated_framebuffer_cannot_be_flushed(vm: Vm) -> None:
    """A userptr blob on a scanout whose guest memory changed: RESOURCE_FLUSH of it is
    an error (not a black frame), and the device keeps serving."""
    blob = vm.userptr_blob(BLOB_BYTES)
    vm.run(gc.set_scanout_blob(0, blob.resource_id, fmt=Format.B8G8R8X8_UNORM, fb_width=16,
                               fb_height=16, stride=64)).expect(Resp.OK_NODATA)
    flush = cmds.resource_flush(blob.resource_id, cmds.Rect(0, 0, 16, 16))
    vm.run(flush).expect(Resp.OK_NODATA)
    vm.s.gpu.detach_backing(blob.resource_id).expect(Resp.OK_NODATA)
    vm.run(flush).expect(Resp.ERR_UNSPEC)
    vm.run(gc.set_scanout_blob(0, 0, fmt=Format.B8G8R8X8_UNORM, fb_width=1, fb_height=1,
                               stride=4)).expect(Resp.OK_NODATA)
    vm.unref(blob.resource_id).expect(Resp.OK_NODATA)
    vm.still_serving()


def test_attach_backing_must_cover_the_blob(vm: Vm) -> None:
    """ATTACH_BACKING of a blob created without entries checks the entries cover its
    size, as RESOURCE_CREATE_BLOB does."""
    rid, size = vm.new_resource_id(), 4 * PAGE_SIZE
    vm.create_blob(rid, [], size, blob_mem=BlobMem.GUEST, flags=0).expect(Resp.OK_NODATA)
    short = scattered_buffer(vm.ram, 3 * PAGE_SIZE)
    vm.s.gpu.attach_backing(rid, short.entries).expect(Resp.ERR_INVALID_PARAMETER)
    whole = scattered_buffer(vm.ram, size)
    vm.s.gpu.attach_backing(rid, whole.entries).expect(Resp.OK_NODATA)
    vm.unref(rid).expect(Resp.OK_NODATA)


def assert_everything_gone(vm: Vm, ctx: ComputeContext, blob: Blob) -> None:
    """After a device reset: the context and the blob are unknown, the blob's id is free,
    and new contexts and blobs work."""
    vm.submit(ctx.ctx_id, [map_cmd(blob.resource_id)]).expect(Resp.ERR_INVALID_CONTEXT_ID)
    fresh = vm.compute_context()
    vm.attach(fresh.ctx_id, blob.resource_id).expect(Resp.ERR_INVALID_RESOURCE_ID)
    reuse = scattered_buffer(vm.ram, BLOB_BYTES)
    vm.create_blob(blob.resource_id, reuse.entries, BLOB_BYTES, ctx_id=fresh.ctx_id
                   ).expect(Resp.OK_NODATA)
    assert_usable(vm, fresh, Blob(blob.resource_id, reuse, fresh.ctx_id))


def test_guest_device_reset(vm: Vm) -> None:
    """The guest resets the device (the control ring restarts from 0): every blob and
    context goes away; the device serves the re-initialised driver."""
    ctx = vm.compute_context()
    blob = ctx.blob(BLOB_BYTES)
    assert_usable(vm, ctx, blob)
    vm.s.restart_queue(0)
    assert_everything_gone(vm, ctx, blob)


def test_vm_system_reset(vm: Vm) -> None:
    """VM reset: rings stopped (GET_VRING_BASE), then started again from index 0."""
    ctx = vm.compute_context()
    blob = ctx.blob(BLOB_BYTES)
    assert_usable(vm, ctx, blob)
    vm.s.stop()
    for queue in vm.s.queues:
        queue.reset()
    vm.s.bases = [0, 0]
    vm.s.cont()
    assert_everything_gone(vm, ctx, blob)


def test_reset_owner(vm: Vm) -> None:
    """RESET_OWNER drops the device state and guest memory; the front-end sets memory
    and rings up again and the device serves it."""
    ctx = vm.compute_context()
    blob = ctx.blob(BLOB_BYTES)
    assert_usable(vm, ctx, blob)
    vm.s.frontend.request(FrontendReq.RESET_OWNER)
    vm.s.regions_sent = []
    for queue in vm.s.queues:
        queue.reset()
    vm.s.bases = [0, 0]
    vm.s.driver_ok()
    vm.still_serving()
    assert_everything_gone(vm, ctx, blob)
    vm.s.gpu.get_capset_info(0).expect(Resp.OK_CAPSET_INFO)
