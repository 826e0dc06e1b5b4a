"""Fences: a fenced SUBMIT_3D is answered only after its work; rings (INFO_RING_IDX,
0..63) are independent timelines, each in order; fenced commands on the global
timeline complete after earlier global work.  Order is read from the used ring (the
order the device completed the commands in)."""

from __future__ import annotations

import struct

import pytest

from protocol.compute import Status
from protocol.virtio_gpu_codes import Cmd, CtrlFlag, Format, Resp
from tests.compute.busy_work import BusyBlob
from tests.frontend import gpu_commands as cmds
from tests.frontend.gpu_commands import Fence
from tests.frontend.gpu_driver import PreparedCommand
from tests.userptr import guest_commands as gc
from tests.userptr.compute_stream import signal_cmd
from tests.userptr.fixtures import VmPool
from tests.userptr.vm import ComputeContext, Vm

LONG = 80  # checksums of the long job (~1 s)

@pytest.fixture
def vm(vm_pool: VmPool) -> Vm:
    """The tests of this module share one back-end with room for their busy blobs."""
    return vm_pool.get(ram_size=256 << 20)



def prepared_submit(ctx: ComputeContext, commands: list[bytes], *, ring: int | None,
                    results: bool = False) -> PreparedCommand:
    """A fenced SUBMIT_3D laid out for :meth:`Vm.completion_order`."""
    vm = ctx.vm
    return vm.prepare(*vm.submit_bytes(ctx.ctx_id, commands, ring_idx=ring,
                                       result=ctx.results if results else None))


def positions(order: list[tuple[int, cmds.GpuResponse]]) -> dict[int, int]:
    """command index -> place in the completion order."""
    return {index: place for place, (index, _) in enumerate(order)}


@pytest.mark.parametrize("ring", [None, 5], ids=["global", "ring 5"])
def test_fenced_submit_answered_after_its_work(vm: Vm, ring: int | None) -> None:
    """When the response arrives the whole result record is there; the response carries
    the fence (and ring) fields."""
    ctx = vm.compute_context()
    busy = BusyBlob(ctx)
    work = busy.work(LONG // 2)
    vm.poison_results(ctx.results, len(work))
    command, stream = vm.submit_bytes(ctx.ctx_id, work, result=ctx.results, ring_idx=ring)
    response = vm.run(command, stream).expect(Resp.OK_NODATA)
    results = vm.results(ctx.results, len(work))
    assert (results.status, results.header.completed) == (Status.OK, len(work))
    hdr = response.hdr
    flags = CtrlFlag.FENCE | (CtrlFlag.INFO_RING_IDX if ring is not None else 0)
    sent = struct.unpack_from("<IIQIB", command)
    assert (hdr.flags, hdr.fence_id, hdr.ctx_id, hdr.ring_idx) == (
        int(flags), sent[2], ctx.ctx_id, ring or 0)


def test_rings_are_independent_timelines(vm: Vm) -> None:
    """Ring 1's short jobs complete while ring 0's long job runs, in their order; ring 0's
    short job waits for its long one; an unfenced command is not held by any of them."""
    ctx = vm.compute_context()
    busy = BusyBlob(ctx)
    slot = busy.va  # short jobs store to the busy blob's first bytes
    commands = [
        prepared_submit(ctx, busy.work(LONG), ring=0),                    # 0
        prepared_submit(ctx, [signal_cmd(slot, 1)], ring=1),              # 1
        prepared_submit(ctx, [signal_cmd(slot + 8, 2)], ring=0),          # 2
        prepared_submit(ctx, [signal_cmd(slot + 16, 3)], ring=1),         # 3
        vm.prepare(cmds.resource_create_2d(vm.new_resource_id(), Format.B8G8R8X8_UNORM,
                                           4, 4)),                        # 4
        prepared_submit(ctx, busy.work(2), ring=1),                       # 5
    ]
    order = vm.completion_order(commands)
    assert all(r.type == Resp.OK_NODATA for _, r in order), [r.type_name for _, r in order]
    at = positions(order)
    assert at[1] < at[3] < at[5] < at[0], "ring 1 waited for ring 0 (or ran out of order)"
    assert at[0] < at[2], "ring 0's second job overtook its first"
    assert at[4] < at[0], "an unfenced command waited for compute work"


def test_rings_belong_to_their_context(vm: Vm) -> None:
    """Ring 0 of another context is another timeline."""
    first, second = vm.compute_context(), vm.compute_context()
    busy = BusyBlob(first)
    data = second.blob(64)
    (va,) = second.map(data)
    order = vm.completion_order([prepared_submit(first, busy.work(LONG), ring=0),
                                 prepared_submit(second, [signal_cmd(va, 9)], ring=0)])
    assert [index for index, _ in order] == [1, 0]
    assert data.buffer.read(vm.ram, 8) == struct.pack("<Q", 9)


def test_all_64_rings(vm_pool: VmPool) -> None:
    """One fenced job on each ring 0..63: all run; each response names its ring."""
    vm = vm_pool.get(ctrl_size=256)  # 64 chains of 3 descriptors in flight
    ctx = vm.compute_context()
    data = ctx.blob(64 * 8)
    (va,) = ctx.map(data)
    commands = [prepared_submit(ctx, [signal_cmd(va + 8 * ring, 1000 + ring)], ring=ring)
                for ring in range(64)]
    order = vm.completion_order(commands)
    for index, response in order:
        response.expect(Resp.OK_NODATA)
        assert response.hdr.ring_idx == index
        assert response.hdr.flags == int(CtrlFlag.FENCE | CtrlFlag.INFO_RING_IDX)
    assert struct.unpack("<64Q", data.buffer.read(vm.ram, 64 * 8)) == tuple(
        range(1000, 1064))


def test_global_submissions_in_order(vm: Vm) -> None:
    """Without INFO_RING_IDX submissions share the global timeline: a short one waits."""
    ctx = vm.compute_context()
    busy = BusyBlob(ctx)
    order = vm.completion_order([prepared_submit(ctx, busy.work(LONG // 2), ring=None),
                                 prepared_submit(ctx, [signal_cmd(busy.va, 1)], ring=None)])
    assert [index for index, _ in order] == [0, 1]


def global_fenced(vm: Vm, fence_id: int) -> dict[str, PreparedCommand]:
    """Fenced non-submit commands on the global timeline (no INFO_RING_IDX)."""
    fence = Fence(fence_id)
    return {
        "RESOURCE_CREATE_2D": vm.prepare(cmds.resource_create_2d(
            vm.new_resource_id(), Format.B8G8R8X8_UNORM, 4, 4, fence)),
        "GET_EDID": vm.s.gpu.prepare(cmds.get_edid(0, fence), cmds.EDID_RESP_SIZE),
        "CTX_CREATE": vm.prepare(gc.ctx_create(200 + fence_id, fence_id=fence_id)),
        "GET_CAPSET_INFO": vm.s.gpu.prepare(cmds.get_capset_info(0, fence),
                                            cmds.CAPSET_INFO_RESP_SIZE),
        "GET_DISPLAY_INFO": vm.s.gpu.prepare(cmds.get_display_info(fence),
                                             cmds.DISPLAY_INFO_RESP_SIZE),
    }


@pytest.mark.parametrize("command", ["RESOURCE_CREATE_2D", "GET_EDID", "CTX_CREATE",
                                     "GET_CAPSET_INFO", "GET_DISPLAY_INFO"])
def test_fenced_command_waits_for_global_work(vm: Vm, command: str) -> None:
    """A fenced non-submit command after a long global submission completes after it
    (the guest signals every fence up to the one completed).  GET_DISPLAY_INFO, answered
    after a display round trip, once skipped the barrier."""
    ctx = vm.compute_context()
    busy = BusyBlob(ctx)
    submit = prepared_submit(ctx, busy.work(LONG), ring=None)
    other = global_fenced(vm, 1000)[command]
    order = vm.completion_order([submit, other])
    assert [index for index, _ in order] == [0, 1], f"{command} completed first"
    response = order[1][1]
    assert response.hdr.flags & CtrlFlag.FENCE and response.hdr.fence_id == 1000


@pytest.mark.parametrize(("ring", "waits"), [(4, True), (5, False)])
def test_fenced_command_on_a_ring(vm: Vm, ring: int, waits: bool) -> None:
    """A fenced non-submit command with INFO_RING_IDX belongs to that ring's timeline:
    it completes after the ring's earlier work, not after another ring's."""
    ctx = vm.compute_context()
    busy = BusyBlob(ctx)
    attach = gc.header(Cmd.CTX_ATTACH_RESOURCE, ctx_id=ctx.ctx_id, fence_id=77,
                       ring_idx=ring) + struct.pack("<II", busy.blob.resource_id, 0)
    order = vm.completion_order([prepared_submit(ctx, busy.work(LONG), ring=4),
                                 vm.prepare(attach)])
    assert [index for index, _ in order] == ([0, 1] if waits else [1, 0])
    response = order[[index for index, _ in order].index(1)][1]
    response.expect(Resp.OK_NODATA)
    assert (response.hdr.fence_id, response.hdr.ring_idx) == (77, ring)


def test_ring_work_does_not_hold_global_fences(vm: Vm) -> None:
    """A fenced global command does not wait for ring work (another timeline)."""
    ctx = vm.compute_context()
    busy = BusyBlob(ctx)
    order = vm.completion_order([prepared_submit(ctx, busy.work(LONG), ring=3),
                                 global_fenced(vm, 7)["RESOURCE_CREATE_2D"]])
    assert [index for index, _ in order] == [1, 0]
    assert all(r.type == Resp.OK_NODATA for _, r in order)
