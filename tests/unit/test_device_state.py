"""The shared pieces of :mod:`vgpu_backend.device_state`, tested directly: the reply
types (:class:`Deferred` above all), capsets, option defaults and the ``set_modes`` /
``after_compute`` rules of :class:`DeviceState`, and :class:`ResourceHooks`."""

from __future__ import annotations

import gc
import weakref
from collections.abc import Iterable, Iterator
from dataclasses import replace

import pytest

from protocol.capsets import DEFAULT_COMPUTE_CAPSET, DEFAULT_USERPTR_CAPSET
from protocol.display import encode_display_info
from protocol.errors import GuestProtocolError
from protocol.limits import Limits
from protocol.virtio_gpu import DisplayOne
from protocol.virtio_gpu_codes import Resp
from tests.unit.device_harness import TWO_D_ONLY, DeviceHarness
from vgpu_backend.device_state import (
    OK,
    Capset,
    Deferred,
    DeviceOptions,
    DeviceState,
    Reply,
    ResourceHooks,
    UserptrProtocol,
)
from vgpu_backend.resources import BlobResource, HostBuffer, Image2D, Resource


def test_option_defaults_are_the_documented_ones() -> None:
    """Pins every :class:`DeviceOptions` default (the command line relies on them)."""
    options = DeviceOptions()
    assert options.max_outputs == 1
    assert options.default_mode == (1280, 800)
    assert options.edid is True
    assert options.blob is True
    assert options.compute is True
    assert options.userptr_protocol is UserptrProtocol.V5
    assert options.userptr_capset_id == DEFAULT_USERPTR_CAPSET
    assert options.compute_capset_id == DEFAULT_COMPUTE_CAPSET
    assert Reply(Resp.OK_NODATA, b"") == OK


def test_a_deferred_holds_the_queue_by_default() -> None:
    """Pins ``Deferred()``'s defaults: pausing, no fallback, no reply yet."""
    deferred = Deferred()
    assert deferred.pause is True
    assert deferred.fallback is None
    assert deferred.reply is None


def test_resolve_records_the_first_reply_only_and_calls_back_once() -> None:
    """Pins that ``resolve`` stores the reply, runs the callback once, and ignores a
    second reply."""
    deferred = Deferred()
    seen: list[Reply] = []
    deferred.on_resolve(seen.append)
    assert seen == []
    first, second = Reply(Resp.OK_NODATA), Reply(Resp.ERR_UNSPEC)
    deferred.resolve(first)
    deferred.resolve(second)
    assert deferred.reply is first
    assert seen == [first]


def test_on_resolve_after_the_reply_runs_at_once() -> None:
    """Pins that a callback registered after ``resolve`` still gets the reply."""
    deferred = Deferred()
    reply = Reply(Resp.OK_CAPSET, b"x")
    deferred.resolve(reply)
    seen: list[Reply] = []
    deferred.on_resolve(seen.append)
    assert seen == [reply]


class _Callback:
    """A callback whose lifetime a weakref can watch."""

    def __init__(self) -> None:
        self.calls = 0

    def __call__(self, reply: Reply) -> None:
        self.calls += 1


def test_resolve_lets_go_of_the_callback() -> None:
    """Pins that a resolved Deferred drops its callback (which may keep a descriptor
    chain and its guest memory alive)."""
    deferred = Deferred()
    callback = _Callback()
    ref = weakref.ref(callback)
    deferred.on_resolve(callback)
    deferred.resolve(OK)
    assert callback.calls == 1
    del callback
    gc.collect()
    assert ref() is None


def test_then_runs_the_action_only_after_the_first_resolves() -> None:
    """Pins ``then``: a new pausing Deferred (ERR_UNSPEC fallback) answered by
    ``action()`` once this one resolves."""
    first = Deferred(pause=False)
    calls: list[int] = []

    def action() -> Reply:
        calls.append(1)
        return Reply(Resp.OK_CAPSET, b"done")

    follow = first.then(action)
    assert follow is not first
    assert follow.pause is True
    assert follow.fallback is not None and follow.fallback() == Reply(Resp.ERR_UNSPEC)
    assert calls == [] and follow.reply is None
    first.resolve(OK)
    assert calls == [1]
    assert follow.reply == Reply(Resp.OK_CAPSET, b"done")


def test_then_turns_a_guest_error_into_its_reply() -> None:
    """Pins that a GuestProtocolError from the action answers with its own code."""
    first = Deferred()

    def action() -> Reply:
        raise GuestProtocolError("gone", Resp.ERR_INVALID_RESOURCE_ID)

    follow = first.then(action)
    first.resolve(OK)
    assert follow.reply == Reply(Resp.ERR_INVALID_RESOURCE_ID)


def test_capset_current_prefers_refresh() -> None:
    """Pins that GET_CAPSET's bytes come from ``refresh`` when there is one."""
    assert Capset(30, 1, b"abcd").current() == b"abcd"
    assert Capset(30, 1, b"abcd", refresh=lambda: b"wxyz").current() == b"wxyz"


@pytest.fixture
def state() -> Iterator[DeviceState]:
    """The DeviceState of a 2D device with max_outputs=2 and at most 4 scanouts."""
    harness = DeviceHarness(limits=Limits(max_hostmem=16 << 20, max_scanouts=4),
                            options=replace(TWO_D_ONLY, max_outputs=2))
    try:
        yield harness.device.state
    finally:
        harness.close()


def _modes(*enabled: int) -> list[DisplayOne]:
    return [DisplayOne(0, 0, 640, 480, 1 if i in enabled else 0, 0) for i in range(16)]


@pytest.mark.parametrize(("enabled", "expected"), [
    ((), 2), ((0,), 2), ((2,), 3), ((3,), 4), ((5,), 4), ((15,), 4)])
def test_num_scanouts_is_max_outputs_or_more_up_to_the_limit(
        state: DeviceState, enabled: tuple[int, ...], expected: int) -> None:
    """Pins ``set_modes``: num_scanouts = min(limit, max(max_outputs, last enabled + 1))."""
    assert state.num_scanouts == 2
    modes = _modes(*enabled)
    state.set_modes(modes, encode_display_info(modes))
    assert state.num_scanouts == expected


def test_after_compute_waits_for_the_barrier(state: DeviceState) -> None:
    """Pins ``after_compute``: with no context the barrier is not even asked; with
    work in flight the action runs only once the barrier resolves, and its reply
    answers the returned Deferred."""
    barrier = Deferred(pause=False)
    asked: list[list[int]] = []

    def compute_barrier(ctx_ids: Iterable[int]) -> Deferred | None:
        asked.append(list(ctx_ids))
        return barrier if asked[-1] else None

    state.compute_barrier = compute_barrier
    ran: list[int] = []

    def action() -> Reply:
        ran.append(1)
        return Reply(Resp.OK_CAPSET, b"late")

    assert state.after_compute((), action) == Reply(Resp.OK_CAPSET, b"late")
    assert ran == [1]
    result = state.after_compute((7,), action)
    assert asked == [[7]]
    assert isinstance(result, Deferred) and result is not barrier
    assert result.pause is True and ran == [1]
    barrier.resolve(OK)
    assert ran == [1, 1]
    assert result.reply == Reply(Resp.OK_CAPSET, b"late")


@pytest.mark.parametrize("waits", [False, True])
def test_a_bug_in_an_action_held_for_compute_is_answered_and_counted(
        state: DeviceState, waits: bool, caplog: pytest.LogCaptureFixture) -> None:
    """An action that ran after the compute work (from a completion, outside the
    device's error boundary) and raised something else than a guest error: ERR_UNSPEC,
    counted, logged with its traceback; a guest error still answers with its code.
    Run at once, the bug goes to the caller (the device's boundary) uncounted."""
    barriers: list[Deferred] = []  # one each: a Deferred has one consumer

    def compute_barrier(ctx_ids: Iterable[int]) -> Deferred | None:
        barriers.append(Deferred(pause=False))
        return barriers[-1] if waits else None

    state.compute_barrier = compute_barrier

    def bug() -> Reply:
        raise KeyError("a bug of ours")

    def refusal() -> Reply:
        raise GuestProtocolError("gone", Resp.ERR_INVALID_RESOURCE_ID)

    if not waits:
        with pytest.raises(KeyError):
            state.after_compute((7,), bug)
        assert state.internal_errors == 0
        return
    buggy, refused = state.after_compute((7,), bug), state.after_compute((7,), refusal)
    assert isinstance(buggy, Deferred) and isinstance(refused, Deferred)
    assert buggy.reply is None and state.internal_errors == 0
    for barrier in barriers:
        barrier.resolve(OK)
    assert buggy.reply == Reply(Resp.ERR_UNSPEC)
    assert refused.reply == Reply(Resp.ERR_INVALID_RESOURCE_ID)
    assert state.internal_errors == 1
    record, = [r for r in caplog.records if "held for compute work" in r.getMessage()]
    assert record.exc_info is not None and "a bug of ours" in caplog.text


def test_resource_hooks_list_the_hooks_of_a_resource_kind_in_order() -> None:
    """``hooks[type(res)]``: the hooks added for its class or a base class, in the
    order they were added; a hook added later shows up for a class already looked up."""
    hooks = ResourceHooks()
    calls: list[str] = []
    hooks.add(BlobResource, lambda res: calls.append("blob"))
    hooks.add(Resource, lambda res: calls.append("any"))
    for hook in hooks[Image2D]:
        hook(Image2D(1))
    assert calls == ["any"]
    hooks.add(Image2D, lambda res: calls.append("image"))
    hooks.add(HostBuffer, lambda res: calls.append("buffer"))
    calls.clear()
    for cls in (BlobResource, Image2D, HostBuffer):
        for hook in hooks[cls]:
            hook(cls(1))
    assert calls == ["blob", "any", "any", "image", "any", "buffer"]


def test_the_device_counts_the_bugs_met_after_compute() -> None:
    """The device's ``internal_errors`` includes :attr:`DeviceState.internal_errors`."""
    harness = DeviceHarness(options=TWO_D_ONLY)
    try:
        assert harness.device.internal_errors == 0
        harness.device.state.internal_errors += 2
        assert harness.device.internal_errors == 2
    finally:
        harness.close()
