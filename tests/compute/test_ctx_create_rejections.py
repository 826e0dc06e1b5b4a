"""CTX_CREATE refused, with the code the device uses for each reason: context id 0 or in
use (ERR_INVALID_CONTEXT_ID), a debug-name length over 64 or a context type (capset id
in the low byte of ``context_init``) that is not a context type (ERR_INVALID_PARAMETER),
more than ``--max-contexts`` live contexts (ERR_OUT_OF_MEMORY).  A refused CTX_CREATE
takes no id and changes no existing context, and the device keeps serving.

The per-context limit of queued unfenced SUBMIT_3D (``Limits.max_queued_submissions``,
64, no command-line option) is backpressure, not an error: the submission over it is
answered OK_NODATA only once the context's backlog shrinks, and the control queue
waits for it.
"""

from __future__ import annotations

import struct

import pytest

from protocol.capsets import DEFAULT_COMPUTE_CAPSET, DEFAULT_USERPTR_CAPSET
from protocol.compute import encode_stream
from protocol.limits import DEFAULT_LIMITS
from protocol.virtio_gpu import CtxCreate
from protocol.virtio_gpu_codes import Cmd, Resp
from protocol.wire import encode
from tests.compute.busy_work import BusyBlob
from tests.userptr import guest_commands as gc
from tests.userptr.compute_stream import fill_cmd, signal_cmd
from tests.userptr.fixtures import VmPool
from tests.userptr.vm import Vm

PAGE = 4096
LONG = 80  # checksums of the long job (~1 s)


def ctx_create(ctx_id: int, *, nlen: int = 4, context_init: int = 0,
               name: bytes = b"test") -> bytes:
    """CTX_CREATE with any ``nlen`` (the name field is always 64 bytes)."""
    return gc.header(Cmd.CTX_CREATE, ctx_id=ctx_id) + encode(
        CtxCreate(nlen, context_init, name.ljust(64, b"\0")))


def assert_compute_context(vm: Vm, ctx_id: int) -> None:
    """``ctx_id`` is a live compute context: a fenced empty stream runs."""
    stream = encode_stream([])
    vm.run(gc.submit_3d(ctx_id, len(stream), fence_id=vm.next_fence()), stream).expect(
        Resp.OK_NODATA)


def assert_no_context(vm: Vm, ctx_id: int) -> None:
    """``ctx_id`` names no context."""
    stream = encode_stream([])
    vm.run(gc.submit_3d(ctx_id, len(stream), fence_id=vm.next_fence()), stream).expect(
        Resp.ERR_INVALID_CONTEXT_ID)
    vm.destroy_context(ctx_id).expect(Resp.ERR_INVALID_CONTEXT_ID)


def test_context_id_0(vm_pool: VmPool) -> None:
    vm = vm_pool.get()
    vm.run(ctx_create(0)).expect(Resp.ERR_INVALID_CONTEXT_ID)
    assert_no_context(vm, 0)
    vm.still_serving()


def test_context_id_in_use(vm_pool: VmPool) -> None:
    """The second CTX_CREATE of an id (of either type) is refused; the first context
    keeps its resources and mappings and still runs work."""
    vm = vm_pool.get()
    ctx = vm.compute_context()
    blob = ctx.blob(PAGE)
    (va,) = ctx.map(blob)
    for context_init in (0, DEFAULT_COMPUTE_CAPSET, DEFAULT_USERPTR_CAPSET):
        vm.run(ctx_create(ctx.ctx_id, context_init=context_init)).expect(
            Resp.ERR_INVALID_CONTEXT_ID)
    ctx.run([fill_cmd(va, 16, 0x01020304)]).response.expect(Resp.OK_NODATA)
    assert blob.buffer.read(vm.ram, 16) == b"\4\3\2\1" * 4
    vm.destroy_context(ctx.ctx_id).expect(Resp.OK_NODATA)
    vm.run(ctx_create(ctx.ctx_id)).expect(Resp.OK_NODATA)  # free again once destroyed
    assert_compute_context(vm, ctx.ctx_id)
    vm.destroy_context(ctx.ctx_id).expect(Resp.OK_NODATA)
    vm.still_serving()


@pytest.mark.parametrize("nlen", [65, 100, 0x1_0000, 0xFFFF_FFFF])
def test_debug_name_longer_than_64(vm_pool: VmPool, nlen: int) -> None:
    """Refused; the id stays free: the same id with nlen 64 (a full name) is created."""
    vm = vm_pool.get()
    ctx_id = 1000 + nlen % 997
    vm.run(ctx_create(ctx_id, nlen=nlen, name=b"n" * 64)).expect(Resp.ERR_INVALID_PARAMETER)
    assert_no_context(vm, ctx_id)
    vm.run(ctx_create(ctx_id, nlen=64, name=b"n" * 64)).expect(Resp.OK_NODATA)
    assert_compute_context(vm, ctx_id)
    vm.destroy_context(ctx_id).expect(Resp.OK_NODATA)
    vm.still_serving()


@pytest.mark.parametrize("capset_id", [1, 2, 27, DEFAULT_COMPUTE_CAPSET + 1, 63, 0xFF])
def test_context_type_not_offered(vm_pool: VmPool, capset_id: int) -> None:
    """Only the compute and userptr capsets (or 0, the default type) name a context
    type."""
    vm = vm_pool.get()
    ctx_id = 2000 + capset_id
    vm.run(ctx_create(ctx_id, context_init=capset_id)).expect(Resp.ERR_INVALID_PARAMETER)
    assert_no_context(vm, ctx_id)
    vm.run(ctx_create(ctx_id, context_init=DEFAULT_COMPUTE_CAPSET)).expect(Resp.OK_NODATA)
    assert_compute_context(vm, ctx_id)
    vm.destroy_context(ctx_id).expect(Resp.OK_NODATA)
    vm.still_serving()


def test_max_contexts(vm_pool: VmPool) -> None:
    """With --max-contexts 3 the fourth live context is refused (ERR_OUT_OF_MEMORY) and
    takes no id; once one is destroyed there is room again."""
    vm = vm_pool.get("--max-contexts", "3")
    ids = [3001, 3002, 3003]
    for ctx_id in ids:
        vm.run(ctx_create(ctx_id)).expect(Resp.OK_NODATA)
    vm.run(ctx_create(3004)).expect(Resp.ERR_OUT_OF_MEMORY)
    vm.run(ctx_create(3005, context_init=DEFAULT_COMPUTE_CAPSET)).expect(Resp.ERR_OUT_OF_MEMORY)
    assert_no_context(vm, 3004)
    for ctx_id in ids:
        assert_compute_context(vm, ctx_id)
    vm.destroy_context(ids[0]).expect(Resp.OK_NODATA)
    vm.run(ctx_create(3004)).expect(Resp.OK_NODATA)
    assert_compute_context(vm, 3004)
    vm.run(ctx_create(ids[0])).expect(Resp.ERR_OUT_OF_MEMORY)
    vm.still_serving()
    for ctx_id in [*ids[1:], 3004]:
        vm.destroy_context(ctx_id).expect(Resp.OK_NODATA)
    vm.run(ctx_create(ids[0])).expect(Resp.OK_NODATA)
    vm.destroy_context(ids[0]).expect(Resp.OK_NODATA)


@pytest.mark.parametrize("over", [False, True], ids=["at the limit", "over the limit"])
def test_queued_submissions_per_context(vm_pool: VmPool, over: bool) -> None:
    """A long unfenced job, then unfenced empty streams up to the limit (or one more),
    then a fenced SIGNAL on ring 5 of the same context.  At the limit the ring-5 SIGNAL
    runs at once, before the long job's own SIGNAL to the same address; over it the
    control queue waits until the long job is done, so the ring-5 SIGNAL lands last.
    Every command is answered OK_NODATA."""
    vm = vm_pool.get(ram_size=256 << 20, ctrl_size=512)
    ctx = vm.compute_context()
    busy = BusyBlob(ctx)
    flag = ctx.blob(PAGE, data=bytes(PAGE))
    (flag_va,) = ctx.map(flag)
    limit = DEFAULT_LIMITS.max_queued_submissions
    long_job = vm.prepare(*vm.submit_bytes(
        ctx.ctx_id, [*busy.work(LONG), signal_cmd(flag_va, 1)], fence=False))
    empties = [vm.prepare(*vm.submit_bytes(ctx.ctx_id, [], fence=False))
               for _ in range(limit - 1 + over)]
    ring_signal = vm.prepare(*vm.submit_bytes(ctx.ctx_id, [signal_cmd(flag_va, 2)],
                                              ring_idx=5))
    order = vm.completion_order([long_job, *empties, ring_signal])
    for _, response in order:
        response.expect(Resp.OK_NODATA)
    last = len(empties) + 1
    if over:
        assert [index for index, _ in order][-2:] == [last - 1, last]
    assert_compute_context(vm, ctx.ctx_id)  # fenced on the global timeline: after the job
    assert flag.buffer.read(vm.ram, 8) == struct.pack("<Q", 2 if over else 1)
    vm.still_serving()
