"""Contexts and compute submissions through ``VirtioGpuDevice.process()``, in process, on
the simulated host GPU.  Compute jobs are held at a :class:`Gate` until the test lets
them run, so what waits for compute work (and what must not) is seen deterministically:
a command answered while a job is held did not wait for it."""

from __future__ import annotations

import logging
import struct
import threading
from collections.abc import Callable, Iterator
from typing import Any
from unittest import mock

import pytest

from protocol.capsets import DEFAULT_COMPUTE_CAPSET, DEFAULT_USERPTR_CAPSET
from protocol.compute import encode_stream
from protocol.limits import Limits
from protocol.virtio_gpu import (
    CtxCreate,
    CtxResource,
    GetCapsetInfo,
    ResourceCreate2d,
    ResourceCreate3d,
    ResourceUnref,
    Submit3d,
    TransferHost3d,
)
from protocol.virtio_gpu_codes import Cmd, CtrlFlag, Resp
from tests.unit.device_harness import (
    BACKING_BASE,
    SLOTS,
    DeviceHarness,
    Response,
    code,
    command,
    mem_entries,
)
from tests.unit.loop_runner import run_until
from vgpu_backend.commands_compute import ComputeCommands
from vgpu_backend.compute.engine import Outcome
from vgpu_backend.device import CONTROL_QUEUE
from vgpu_backend.device_state import DeviceOptions
from vgpu_backend.hostgpu.base import HostGpu, HostGpuError
from vgpu_backend.hostgpu.factory import HostGpuOptions, create_host_gpu

EMPTY = encode_stream([])


def ctx_create(ctx_id: int, context_init: int = 0) -> bytes:
    """CTX_CREATE without a debug name."""
    return command(Cmd.CTX_CREATE, CtxCreate(0, context_init, bytes(64)), ctx_id=ctx_id)


def ctx_resource(cmd: int, ctx_id: int, resource_id: int) -> bytes:
    """CTX_ATTACH_RESOURCE / CTX_DETACH_RESOURCE."""
    return command(cmd, CtxResource(resource_id), ctx_id=ctx_id)


def submit(ctx_id: int, stream: bytes = EMPTY, *, fence_id: int = 0, flags: int = 0,
           ring_idx: int = 0) -> bytes:
    """SUBMIT_3D with the stream right after the body (fenced when ``fence_id``)."""
    if fence_id:
        flags |= CtrlFlag.FENCE
    return command(Cmd.SUBMIT_3D, Submit3d(len(stream)), flags=flags, fence_id=fence_id,
                   ctx_id=ctx_id, ring_idx=ring_idx) + stream


class Gate:
    """Stands in for ``Engine.run``: each job waits until released (in submission
    order), then runs for real."""

    def __init__(self, real: Callable[..., Outcome]) -> None:
        self._real = real
        self._lock = threading.Lock()
        self._events: dict[int, threading.Event] = {}
        self._released = 0
        self._all = False
        #: jobs that have started (are waiting or ran)
        self.started = 0

    def _event(self, index: int) -> threading.Event:
        with self._lock:
            event = self._events.setdefault(index, threading.Event())
            if self._all or index < self._released:
                event.set()
            return event

    def run(self, *args: Any, **kwargs: Any) -> Outcome:
        """The patched ``Engine.run``."""
        with self._lock:
            index, self.started = self.started, self.started + 1
        assert self._event(index).wait(10), "a held job was never released"
        return self._real(*args, **kwargs)

    def release(self) -> None:
        """Let the next held job run."""
        with self._lock:
            index, self._released = self._released, self._released + 1
        self._event(index).set()

    def release_all(self) -> None:
        """Let every job run, now and later."""
        with self._lock:
            self._all = True
            events = list(self._events.values())
        for event in events:
            event.set()


class Driver:
    """Commands in flight on one harness, their answers collected by descriptor head."""

    def __init__(self, harness: DeviceHarness, gate: Gate) -> None:
        self.h = harness
        self.gate = gate
        self.answers: dict[int, Response] = {}

    @property
    def compute(self) -> ComputeCommands:
        """The device's compute commands."""
        assert self.h.device.compute is not None
        return self.h.device.compute

    def send(self, cmd: bytes) -> int:
        """Queue and kick one command; returns its head (to look its answer up)."""
        head = 2 * (self.h.control.avail_idx % SLOTS)
        self.h.stage(cmd)
        self.h.device.process(CONTROL_QUEUE)
        self.poll()
        return head

    def poll(self) -> None:
        """Collect the answers published so far."""
        for response in self.h.collect():
            self.answers[response.head] = response

    def answered(self, head: int) -> bool:
        """The command at ``head`` has been answered."""
        self.poll()
        return head in self.answers

    def wait(self, head: int) -> int:
        """Run the loop until the command at ``head`` is answered; its response type."""
        run_until(self.h.loop, lambda: self.answered(head))
        return self.answers.pop(head).type

    def ok(self, cmd: bytes) -> None:
        """A command answered OK_NODATA."""
        assert Resp(self.wait(self.send(cmd))) == Resp.OK_NODATA


@pytest.fixture
def make_device() -> Iterator[Callable[..., Driver]]:
    """Factory of compute devices (``Limits`` fields as keywords) on the simulated host
    GPU, their jobs behind a :attr:`Driver.gate`."""
    made: list[tuple[Driver, HostGpu]] = []

    def make(**limits: int) -> Driver:
        gpu = create_host_gpu(HostGpuOptions(gpu="sim"))
        harness = DeviceHarness(Limits(**{"max_hostmem": 16 << 20, **limits}),
                                DeviceOptions(), host_gpu=gpu)
        compute = harness.device.compute
        assert compute is not None
        gate = Gate(compute.engine.run)
        compute.engine.run = gate.run  # type: ignore[method-assign]
        made.append((Driver(harness, gate), gpu))
        return made[-1][0]

    yield make
    errors = 0
    for driver, gpu in made:
        driver.gate.release_all()
        errors += driver.h.device.internal_errors
        driver.h.close()
        gpu.close()
    assert errors == 0


# --- without context types --------------------------------------------------------------


def test_no_context_types_refuses_ctx_create(dev: DeviceHarness) -> None:
    """A device with no context type (2D only) answers CTX_CREATE ERR_UNSPEC."""
    assert code(dev, ctx_create(1)) == "ERR_UNSPEC"


def test_context_commands_on_an_unknown_context(dev: DeviceHarness) -> None:
    """ATTACH, DETACH and DESTROY naming no live context: ERR_INVALID_CONTEXT_ID, whether
    the resource exists or not (the context is checked first)."""
    dev.create_2d(1, 4, 4)
    for resource_id in (1, 99):
        for cmd in (Cmd.CTX_ATTACH_RESOURCE, Cmd.CTX_DETACH_RESOURCE):
            assert code(dev, ctx_resource(cmd, 5, resource_id)) == "ERR_INVALID_CONTEXT_ID"
    assert code(dev, command(Cmd.CTX_DESTROY, ctx_id=5)) == "ERR_INVALID_CONTEXT_ID"
    assert code(dev, ctx_resource(Cmd.CTX_ATTACH_RESOURCE, 0, 1)) == "ERR_INVALID_CONTEXT_ID"


# --- CTX_CREATE ---------------------------------------------------------------------------


def test_id_checks_come_before_the_context_limit(make_device: Callable[..., Driver]) -> None:
    """At --max-contexts, an id in use or id 0 is still ERR_INVALID_CONTEXT_ID; only a
    fresh id gets ERR_OUT_OF_MEMORY."""
    d = make_device(max_contexts=1)
    d.ok(ctx_create(1))
    assert Resp(d.wait(d.send(ctx_create(1)))) == Resp.ERR_INVALID_CONTEXT_ID
    assert Resp(d.wait(d.send(ctx_create(0)))) == Resp.ERR_INVALID_CONTEXT_ID
    assert Resp(d.wait(d.send(ctx_create(2)))) == Resp.ERR_OUT_OF_MEMORY


@pytest.mark.parametrize(("context_init", "capset_id"), [
    (0xFFFF_FF00, DEFAULT_COMPUTE_CAPSET),
    (0x100 | DEFAULT_USERPTR_CAPSET, DEFAULT_USERPTR_CAPSET),
    (0xABCD_0000 | DEFAULT_COMPUTE_CAPSET, DEFAULT_COMPUTE_CAPSET),
])
def test_context_type_is_the_low_byte(make_device: Callable[..., Driver], context_init: int,
                                      capset_id: int) -> None:
    """Only the low byte of ``context_init`` names the context type (0: the default)."""
    d = make_device()
    d.ok(ctx_create(1, context_init))
    assert d.h.device.contexts.get(1).capset_id == capset_id


def test_host_gpu_refusing_the_context(make_device: Callable[..., Driver]) -> None:
    """The host GPU refuses a context (context isolation: no KFD process): ERR_UNSPEC,
    and the id stays free."""
    d = make_device()
    gpu = d.h.device.state.host_gpu
    with mock.patch.object(gpu, "open_context", side_effect=HostGpuError("no process")):
        assert Resp(d.wait(d.send(ctx_create(1)))) == Resp.ERR_UNSPEC
    d.ok(ctx_create(1))


# --- SUBMIT_3D ----------------------------------------------------------------------------


def test_a_submission_one_byte_over_the_limit_is_refused_unread(
        make_device: Callable[..., Driver], caplog: pytest.LogCaptureFixture) -> None:
    """--max-submit-bytes is what the compute capset publishes: one byte more is refused
    by the size check (before the stream is read), exactly the limit runs."""
    d = make_device(max_submit_bytes=len(EMPTY))
    d.gate.release_all()
    d.ok(ctx_create(1))
    with caplog.at_level(logging.INFO, logger="vgpu_backend"):
        assert Resp(d.wait(d.send(submit(1, EMPTY + bytes(1))))) == \
            Resp.ERR_INVALID_PARAMETER
    assert f"submission of {len(EMPTY) + 1} bytes (limit {len(EMPTY)})" in caplog.text
    d.ok(submit(1))


def test_destroying_a_context_closes_its_host_gpu_context(
        make_device: Callable[..., Driver]) -> None:
    """Every CTX_CREATE opens a host-GPU context (a KFD process with context isolation)
    and its CTX_DESTROY closes it: none outlives its context."""
    d = make_device()
    gpu = d.h.device.state.host_gpu
    assert gpu is not None
    with mock.patch.object(gpu, "open_context", wraps=gpu.open_context) as opened, \
            mock.patch.object(gpu, "close_context", wraps=gpu.close_context) as closed:
        d.ok(ctx_create(1))
        d.ok(ctx_create(2))
        d.ok(command(Cmd.CTX_DESTROY, ctx_id=2))
        assert [c.args for c in opened.call_args_list] == [(1,), (2,)]
        assert [c.args for c in closed.call_args_list] == [(2,)]


def test_an_unref_resource_leaves_the_contexts_it_was_attached_to(
        make_device: Callable[..., Driver]) -> None:
    """RESOURCE_UNREF takes the resource out of its contexts: a later resource with the
    same id is not theirs (their destruction leaves it alone)."""
    d = make_device()
    d.ok(ctx_create(1))
    create = command(Cmd.RESOURCE_CREATE_3D,
                     ResourceCreate3d(9, 0, 64, 0, 4096, 1, 1, 1, 0, 0, 0), ctx_id=1)
    d.ok(create)
    d.ok(ctx_resource(Cmd.CTX_ATTACH_RESOURCE, 1, 9))
    assert d.h.device.contexts.get(1).resources == {9}
    d.ok(command(Cmd.RESOURCE_UNREF, ResourceUnref(9)))
    assert d.h.device.contexts.get(1).resources == set()
    d.h.create_2d(9, 4, 4)  # the id again, in no context
    d.ok(command(Cmd.CTX_DESTROY, ctx_id=1))
    assert d.h.device.state.resources.get(9).contexts == set()


def test_a_fenced_command_waiting_for_compute_work_does_not_hold_the_queue(
        make_device: Callable[..., Driver]) -> None:
    """A fenced RESOURCE_CREATE_2D behind running compute work on the global timeline:
    its answer waits for that work, but later unfenced commands are answered now."""
    d = make_device()
    d.ok(ctx_create(1))
    job = d.send(submit(1, fence_id=1))
    fenced = d.send(command(Cmd.RESOURCE_CREATE_2D, ResourceCreate2d(5, 2, 4, 4),
                            flags=CtrlFlag.FENCE, fence_id=2))
    plain = d.send(command(Cmd.GET_CAPSET_INFO, GetCapsetInfo(0)))
    assert d.answered(plain), "a fence's wait held the whole control queue"
    assert not d.answered(job) and not d.answered(fenced)
    d.gate.release_all()
    assert Resp(d.wait(job)) == Resp.OK_NODATA
    assert Resp(d.wait(fenced)) == Resp.OK_NODATA


def test_ring_idx_without_info_ring_idx_is_ignored(make_device: Callable[..., Driver]) -> None:
    """ring_idx beyond the 64 rings is refused only with INFO_RING_IDX; without it the
    field means nothing and the submission runs."""
    d = make_device()
    d.gate.release_all()
    d.ok(ctx_create(1))
    d.ok(submit(1, fence_id=1, ring_idx=200))
    assert Resp(d.wait(d.send(submit(1, fence_id=2, ring_idx=200,
                                     flags=CtrlFlag.INFO_RING_IDX)))) == \
        Resp.ERR_INVALID_PARAMETER


def test_a_job_that_raises_fails_its_fence(make_device: Callable[..., Driver]) -> None:
    """A fenced submission whose job raised (a bug of ours) is answered ERR_UNSPEC, not
    OK; the next submission runs."""
    d = make_device()
    d.gate.release_all()
    d.ok(ctx_create(1))
    with mock.patch.object(d.compute.engine, "run", side_effect=RuntimeError("bug")):
        assert Resp(d.wait(d.send(submit(1, fence_id=1)))) == Resp.ERR_UNSPEC
    d.ok(submit(1, fence_id=2))


def test_finished_work_leaves_no_bookkeeping(make_device: Callable[..., Driver]) -> None:
    """Once every submission of a context is done (fenced or not, on rings or the global
    timeline), nothing is kept for it: the per-context job tables do not grow with the
    contexts a guest ever used."""
    d = make_device()
    d.gate.release_all()
    for ctx_id in (1, 2):
        d.ok(ctx_create(ctx_id))
        d.ok(submit(ctx_id))
        d.ok(submit(ctx_id, fence_id=ctx_id, ring_idx=3, flags=CtrlFlag.INFO_RING_IDX))
        d.ok(submit(ctx_id, fence_id=10 + ctx_id))
    run_until(d.h.loop, lambda: not d.compute.timelines.busy())
    assert (d.compute._queued, d.compute._last_jobs, d.compute.queued_bytes) == ({}, {}, 0)


def test_backlog_room_once_at_the_limit_again(make_device: Callable[..., Driver]) -> None:
    """With max_queued_submissions 2, the third unfenced submission of a context holds
    the queue until the backlog is back at the limit: the first job's completion is
    enough, the second may still be running."""
    d = make_device(max_queued_submissions=2)
    gate = d.gate
    d.ok(ctx_create(1))
    d.ok(submit(1))
    d.ok(submit(1))
    third = d.send(submit(1))
    assert not d.answered(third)
    gate.release()
    run_until(d.h.loop, lambda: gate.started == 2)  # the first was delivered
    assert d.answered(third), "the backlog was at the limit, but the queue still waited"
    gate.release_all()


@pytest.mark.parametrize(("budget_slack", "holds"), [(0, False), (-1, True)])
def test_queued_bytes_budget_boundary(make_device: Callable[..., Driver], budget_slack: int,
                                      holds: bool) -> None:
    """An unfenced submission that brings the queued stream bytes to exactly
    --max-queued-submit-bytes is answered at once; one byte over, it holds the queue
    until its job has run."""
    d = make_device(max_queued_submit_bytes=len(EMPTY) + budget_slack)
    gate = d.gate
    d.ok(ctx_create(1))
    head = d.send(submit(1))
    assert d.answered(head) is not holds
    gate.release_all()
    assert Resp(d.wait(head)) == Resp.OK_NODATA


# --- what waits for compute work ---------------------------------------------------------


def test_detach_is_idempotent_and_only_a_valid_one_waits(
        make_device: Callable[..., Driver]) -> None:
    """ATTACH and DETACH are idempotent (detaching what is not attached is OK).
    CTX_DETACH_RESOURCE of an unknown resource is refused at once, although the context
    has work in flight; a valid detach waits for that work."""
    d = make_device()
    gate = d.gate
    d.ok(ctx_create(1))
    d.h.create_2d(7, 4, 4)
    d.h.create_2d(8, 4, 4)
    d.ok(ctx_resource(Cmd.CTX_DETACH_RESOURCE, 1, 8))  # never attached: nothing to do
    d.ok(ctx_resource(Cmd.CTX_ATTACH_RESOURCE, 1, 7))
    d.ok(ctx_resource(Cmd.CTX_ATTACH_RESOURCE, 1, 7))  # idempotent
    assert Resp(d.wait(d.send(ctx_resource(Cmd.CTX_ATTACH_RESOURCE, 1, 99)))) == \
        Resp.ERR_INVALID_RESOURCE_ID
    d.ok(submit(1))
    refused = d.send(ctx_resource(Cmd.CTX_DETACH_RESOURCE, 1, 99))
    assert d.answered(refused), "a refused DETACH waited for the context's work"
    assert Resp(d.answers.pop(refused).type) == Resp.ERR_INVALID_RESOURCE_ID
    detach = d.send(ctx_resource(Cmd.CTX_DETACH_RESOURCE, 1, 7))
    assert not d.answered(detach)
    gate.release()
    assert Resp(d.wait(detach)) == Resp.OK_NODATA


def test_transfer_to_host_waits_for_compute(make_device: Callable[..., Driver]) -> None:
    """TRANSFER_TO_HOST_3D into a host buffer waits for work of the buffer's contexts
    (the work may still read the old bytes), then runs; without backing it is refused
    at once (ERR_UNSPEC)."""
    d = make_device()
    gate = d.gate
    d.ok(ctx_create(1))
    d.ok(command(Cmd.RESOURCE_CREATE_3D,
                 ResourceCreate3d(9, 0, 64, 0, 4096, 1, 1, 1, 0, 0, 0), ctx_id=1))
    d.ok(submit(1))
    to_host = command(Cmd.TRANSFER_TO_HOST_3D, TransferHost3d(0, 0, 0, 4096, 1, 1, 0, 9, 0, 0, 0))
    bare = d.send(to_host)
    assert d.answered(bare), "a TRANSFER without backing waited for compute work"
    assert Resp(d.answers.pop(bare).type) == Resp.ERR_UNSPEC
    d.ok(command(Cmd.RESOURCE_ATTACH_BACKING,
                 struct.pack("<II", 9, 1) + mem_entries((BACKING_BASE, 4096))))
    transfer = d.send(to_host)
    assert not d.answered(transfer), "TRANSFER_TO_HOST_3D overtook the context's work"
    gate.release()
    assert Resp(d.wait(transfer)) == Resp.OK_NODATA
