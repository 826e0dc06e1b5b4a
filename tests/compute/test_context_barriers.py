"""A resource or context going away waits only for the compute work of the contexts
that can reach it: another context's long job does not hold the control queue, while
the work of the resource's own contexts still does.  Order is read from the used ring."""

from __future__ import annotations

import pytest

from protocol.virtio_gpu_codes import Cmd, Resp
from tests.compute.busy_work import BusyBlob
from tests.frontend import gpu_commands as cmds
from tests.frontend.gpu_driver import PreparedCommand
from tests.userptr import guest_commands as gc
from tests.userptr.fixtures import VmPool
from tests.userptr.vm import ComputeContext, Vm

LONG = 80  # checksums of the long job (~1 s)


@pytest.fixture
def vm(vm_pool: VmPool) -> Vm:
    """One back-end with room for the busy blobs."""
    return vm_pool.get(ram_size=256 << 20)


def busy_submit(ctx: ComputeContext) -> PreparedCommand:
    """A fenced SUBMIT_3D of about a second of work in ``ctx`` (global timeline)."""
    busy = BusyBlob(ctx)
    return ctx.vm.prepare(*ctx.vm.submit_bytes(ctx.ctx_id, busy.work(LONG)))


def going_away(vm: Vm, what: str, ctx: ComputeContext) -> PreparedCommand:
    """The command that takes a blob of ``ctx`` (or ``ctx`` itself) away."""
    blob = ctx.blob(8192)
    if what == "detach":
        return vm.prepare(gc.ctx_resource(Cmd.CTX_DETACH_RESOURCE, ctx.ctx_id,
                                          blob.resource_id))
    if what == "unref":
        return vm.prepare(cmds.resource_unref(blob.resource_id))
    return vm.prepare(gc.ctx_destroy(ctx.ctx_id))


@pytest.mark.parametrize("what", ["detach", "unref", "destroy"])
def test_other_contexts_work_does_not_hold_the_queue(vm: Vm, what: str) -> None:
    busy, other = vm.compute_context(), vm.compute_context()
    order = vm.completion_order([busy_submit(busy), going_away(vm, what, other)])
    assert [index for index, _ in order] == [1, 0], f"{what} waited for another context"
    assert all(response.type == Resp.OK_NODATA for _, response in order)
    vm.still_serving()


@pytest.mark.parametrize("what", ["detach", "unref", "destroy"])
def test_own_contexts_work_is_waited_for(vm: Vm, what: str) -> None:
    ctx = vm.compute_context()
    order = vm.completion_order([busy_submit(ctx), going_away(vm, what, ctx)])
    assert [index for index, _ in order] == [0, 1], f"{what} did not wait for its context"
    assert all(response.type == Resp.OK_NODATA for _, response in order)
    vm.still_serving()


def test_over_the_queued_bytes_budget_the_queue_waits(vm_pool: VmPool) -> None:
    """Beyond --max-queued-submit-bytes the submission that went over holds the queue
    until it has run, although the next command is another context's."""
    vm = vm_pool.get("--max-queued-submit-bytes", "64", ram_size=256 << 20)
    busy, other = vm.compute_context(), vm.compute_context()
    order = vm.completion_order([busy_submit(busy), going_away(vm, "unref", other)])
    assert [index for index, _ in order] == [0, 1], "the queue did not wait"
    assert all(response.type == Resp.OK_NODATA for _, response in order)
    vm.still_serving()
