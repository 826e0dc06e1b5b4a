"""CTX_DESTROY, CTX_DETACH_RESOURCE, RESOURCE_UNREF and RESOURCE_DETACH_BACKING while a
blob is mapped and work on it is in flight: the command waits for the work, then the
mapping is gone, and the guest pages are not touched afterwards."""

from __future__ import annotations

import struct
import time
import zlib
from collections.abc import Callable

import pytest

from protocol.compute import Kernel, Status, buffer_arg, u64_arg
from protocol.virtio_gpu_codes import Cmd, Resp
from tests.compute.busy_work import BusyBlob
from tests.frontend import gpu_commands as cmds
from tests.userptr import guest_commands as gc
from tests.userptr.compute_stream import dispatch, fill_cmd, map_cmd, signal_cmd
from tests.userptr.fixtures import VmPool
from tests.userptr.vm import Blob, ComputeContext, Vm

PAGE = 4096
LONG = 80
MARK = 0x600DF00D
QUIET = 0.3  # seconds to watch the pages after the command was answered

@pytest.fixture
def vm(vm_pool: VmPool) -> Vm:
    """The tests of this module share one back-end with room for their busy blobs."""
    return vm_pool.get(ram_size=256 << 20)



def start_work(ctx: ComputeContext, busy: BusyBlob, target: Blob, va: int,
               ring: int | None) -> None:
    """Queue (unfenced) a long job that ends by writing ``target``: a FILL of all of it,
    then a SIGNAL of MARK at its start."""
    work = [*busy.work(LONG), fill_cmd(va, target.buffer.size, 0x01020304),
            signal_cmd(va, MARK)]
    ctx.vm.submit(ctx.ctx_id, work, fence=False, ring_idx=ring).expect(Resp.OK_NODATA)


def finished(vm: Vm, target: Blob) -> bool:
    """The job's final writes are in guest memory."""
    raw = target.buffer.read(vm.ram)
    return raw[:8] == struct.pack("<Q", MARK) and raw[8:] == struct.pack(
        "<I", 0x01020304) * ((len(raw) - 8) // 4)


def assert_quiet(vm: Vm, target: Blob) -> None:
    """Nothing writes the pages any more."""
    before = target.buffer.read(vm.ram)
    time.sleep(QUIET)
    assert target.buffer.read(vm.ram) == before


def old_va_faults(ctx: ComputeContext, va: int, target: Blob) -> None:
    """Writing through the old VA in ``ctx`` faults and leaves the pages alone."""
    before = target.buffer.read(ctx.vm.ram)
    done = ctx.run([fill_cmd(va, 64, 0xEEEEEEEE)])
    done.response.expect(Resp.ERR_UNSPEC)
    assert (done.results.status, done.results.header.fault_address) == (Status.FAULT, va)
    assert target.buffer.read(ctx.vm.ram) == before


def scene(vm: Vm) -> tuple[ComputeContext, BusyBlob, Blob, int]:
    """A context with a busy blob and a mapped target blob."""
    ctx = vm.compute_context()
    busy = BusyBlob(ctx)
    target = ctx.blob(3 * PAGE)
    (va,) = ctx.map(target)
    return ctx, busy, target, va


@pytest.mark.parametrize("ring", [None, 2], ids=["global", "ring 2"])
def test_unref_waits_for_work(vm: Vm, ring: int | None) -> None:
    """RESOURCE_UNREF of a mapped blob under work: answered after the work; then the VA
    faults and the pages stay as the work left them."""
    ctx, busy, target, va = scene(vm)
    start_work(ctx, busy, target, va, ring)
    vm.unref(target.resource_id).expect(Resp.OK_NODATA)
    assert finished(vm, target), "UNREF was answered while work on the blob was running"
    assert_quiet(vm, target)
    old_va_faults(ctx, va, target)


@pytest.mark.parametrize("ring", [None, 2], ids=["global", "ring 2"])
def test_detach_backing_waits_for_work(vm: Vm, ring: int | None) -> None:
    """DETACH_BACKING of a mapped userptr blob under work (an invalidation): answered
    after the work; then the VA faults and the pages stay as the work left them."""
    ctx, busy, target, va = scene(vm)
    start_work(ctx, busy, target, va, ring)
    vm.s.gpu.detach_backing(target.resource_id).expect(Resp.OK_NODATA)
    assert finished(vm, target), "DETACH_BACKING was answered while work was running"
    assert_quiet(vm, target)
    old_va_faults(ctx, va, target)


@pytest.mark.parametrize("ring", [None, 2], ids=["global", "ring 2"])
def test_detach_waits_for_work(vm: Vm, ring: int | None) -> None:
    """CTX_DETACH_RESOURCE under work: answered after it; the context's mapping is gone
    (the VA faults, MAP refuses until it is attached again)."""
    ctx, busy, target, va = scene(vm)
    start_work(ctx, busy, target, va, ring)
    vm.detach(ctx.ctx_id, target.resource_id).expect(Resp.OK_NODATA)
    assert finished(vm, target), "DETACH was answered while work on the blob was running"
    assert_quiet(vm, target)
    old_va_faults(ctx, va, target)
    assert ctx.run([map_cmd(target.resource_id)]).results.statuses() == [
        Status.INVALID_RESOURCE]
    vm.attach(ctx.ctx_id, target.resource_id).expect(Resp.OK_NODATA)
    assert ctx.map(target) == [va]


@pytest.mark.parametrize("ring", [None, 2], ids=["global", "ring 2"])
def test_ctx_destroy_waits_for_work(vm: Vm, ring: int | None) -> None:
    """CTX_DESTROY under work: answered after it; the context is gone; nothing writes
    the pages afterwards."""
    ctx, busy, target, va = scene(vm)
    start_work(ctx, busy, target, va, ring)
    vm.destroy_context(ctx.ctx_id).expect(Resp.OK_NODATA)
    assert finished(vm, target), "CTX_DESTROY was answered while its work was running"
    assert_quiet(vm, target)
    vm.submit(ctx.ctx_id, [signal_cmd(va, 1)]).expect(Resp.ERR_INVALID_CONTEXT_ID)
    vm.destroy_context(ctx.ctx_id).expect(Resp.ERR_INVALID_CONTEXT_ID)


COMMANDS: dict[str, Callable[[ComputeContext, Blob], bytes]] = {
    "UNREF": lambda ctx, b: cmds.resource_unref(b.resource_id),
    "DETACH": lambda ctx, b: gc.ctx_resource(Cmd.CTX_DETACH_RESOURCE, ctx.ctx_id,
                                             b.resource_id),
    "CTX_DESTROY": lambda ctx, b: gc.ctx_destroy(ctx.ctx_id),
    "DETACH_BACKING": lambda ctx, b: cmds.detach_backing(b.resource_id),
}


@pytest.mark.parametrize("what", list(COMMANDS))
def test_answered_after_fenced_work(vm: Vm, what: str) -> None:
    """In one kick after a fenced submission: the command completes after it."""
    ctx, busy, target, va = scene(vm)
    submit = vm.prepare(*vm.submit_bytes(ctx.ctx_id, [*busy.work(LONG), signal_cmd(va, MARK)],
                                         ring_idx=1))
    order = vm.completion_order([submit, vm.prepare(COMMANDS[what](ctx, target))])
    assert [index for index, _ in order] == [0, 1]
    assert all(r.type == Resp.OK_NODATA for _, r in order)


def test_without_work_in_flight(vm: Vm) -> None:
    """Mapped but idle: UNREF is answered at once and the VA faults afterwards."""
    ctx, _, target, va = scene(vm)
    vm.unref(target.resource_id).expect(Resp.OK_NODATA)
    old_va_faults(ctx, va, target)


def test_blob_outlives_its_context(vm: Vm) -> None:
    """A HOST3D_GUEST userptr blob stays usable after the context it was created in is
    destroyed (the resource is not unref'd).  CTX_DESTROY once released the host mapping
    of every blob created in the context, leaving a MAP_RESOURCE that faulted (or read
    whatever blob reused the VA)."""
    first = vm.compute_context()
    blob = first.blob(2 * PAGE)
    first.map(blob)
    vm.destroy_context(first.ctx_id).expect(Resp.OK_NODATA)
    second = vm.compute_context()
    vm.attach(second.ctx_id, blob.resource_id).expect(Resp.OK_NODATA)
    done = second.run([map_cmd(blob.resource_id)])
    if done.results.status != Status.OK:
        return  # refusing to map it would be acceptable too
    (va,) = done.results.values()
    read = second.run([dispatch(Kernel.CHECKSUM_CRC32, buffer_arg(va), u64_arg(2 * PAGE))])
    assert read.results.status == Status.OK, f"mapped at {va:#x} but the access faults"
    assert read.results.values()[0] == zlib.crc32(blob.buffer.read(vm.ram))


def test_recreated_context_id_starts_empty(vm: Vm) -> None:
    """CTX_DESTROY detaches every resource: a new context with the same id reaches none
    of them (MAP_RESOURCE refuses) until they are attached to it again."""
    first = vm.compute_context()
    blob = first.blob(PAGE)
    first.map(blob)
    vm.destroy_context(first.ctx_id).expect(Resp.OK_NODATA)
    vm.run(gc.ctx_create(first.ctx_id)).expect(Resp.OK_NODATA)
    again = ComputeContext(vm, first.ctx_id, vm.userptr_blob(PAGE, ctx_id=first.ctx_id))
    assert again.run([map_cmd(blob.resource_id)]).results.statuses() == [
        Status.INVALID_RESOURCE]
    vm.attach(again.ctx_id, blob.resource_id).expect(Resp.OK_NODATA)
    assert again.run([map_cmd(blob.resource_id)]).results.status == Status.OK
    vm.destroy_context(again.ctx_id).expect(Resp.OK_NODATA)
