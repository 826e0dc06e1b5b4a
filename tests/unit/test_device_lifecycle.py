"""Device life cycle: display socket replaced or lost, quiesce, reset, memory removal."""

from __future__ import annotations

import socket
from collections.abc import Iterator

import pytest

from protocol.display import DisplayReq, VhostUserGpuScanout, decode_display_info
from protocol.limits import Limits
from protocol.vhost_user import MemRegion
from protocol.virtio_gpu import (
    CtrlHdr,
    DisplayOne,
    ResourceCreate2d,
    ResourceUnref,
    SetScanout,
    TransferToHost2d,
)
from protocol.virtio_gpu_codes import Cmd, Resp
from protocol.wire import decode
from tests.unit.device_harness import DeviceHarness, command, edid_of, peer_of
from tests.unit.display_peer import DisplayPeer
from tests.unit.loop_runner import run_until
from vgpu_backend.device import CONTROL_QUEUE
from vgpu_backend.device_state import Deferred, Reply
from vgpu_backend.display import DisplayState

DEFAULT_MODE = DisplayOne(0, 0, 1280, 800, 1, 0)
#: a command type no virtio-gpu device serves, given a test handler
_NEVER_ANSWERED = 0x0F00


@pytest.fixture
def shown() -> Iterator[DeviceHarness]:
    harness = DeviceHarness(limits=Limits(max_hostmem=16 << 20, display_reply_timeout=5.0),
                            display=True)
    yield harness
    assert harness.device.internal_errors == 0
    harness.close()


def show_resource(harness: DeviceHarness, width: int = 8, height: int = 4) -> None:
    harness.create_2d(1, width, height)
    harness.ok(command(Cmd.TRANSFER_TO_HOST_2D, TransferToHost2d(0, 0, width, height, 0, 1)))
    harness.ok(command(Cmd.SET_SCANOUT, SetScanout(0, 0, width, height, 0, 1)))


def test_display_loss_answers_the_waiting_command(shown: DeviceHarness) -> None:
    peer = peer_of(shown)
    peer.answer_display_info = False
    assert shown.submit(command(Cmd.GET_DISPLAY_INFO)) == []
    assert shown.submit(command(Cmd.RESOURCE_CREATE_2D, ResourceCreate2d(1, 2, 4, 4))) == []
    peer.close()
    run_until(shown.loop, lambda: shown.control.used_idx() == 2)
    first, second = shown.collect()
    assert first.type == Resp.OK_DISPLAY_INFO
    assert decode_display_info(first.raw[:408])[0] == DEFAULT_MODE
    assert second.type == Resp.OK_NODATA
    # without a display the device answers at once
    assert shown.run(command(Cmd.GET_DISPLAY_INFO)).type == Resp.OK_DISPLAY_INFO


def test_quiesce_answers_in_flight_commands(shown: DeviceHarness) -> None:
    peer_of(shown).answer_display_info = False
    assert shown.submit(command(Cmd.GET_DISPLAY_INFO)) == []
    shown.device.quiesce()
    got = shown.collect()
    assert [Resp(r.type).name for r in got] == ["OK_DISPLAY_INFO"]
    assert shown.control.take_used() == []  # answered once only
    peer_of(shown).answer_display_info = True
    assert shown.run(command(Cmd.GET_DISPLAY_INFO)).type == Resp.OK_DISPLAY_INFO


def test_a_new_display_socket_replaces_the_old_and_gets_the_scanouts(
        shown: DeviceHarness) -> None:
    old_peer = peer_of(shown)
    show_resource(shown)
    run_until(shown.loop, lambda: bool(old_peer.of(DisplayReq.UPDATE)))
    ours, theirs = socket.socketpair()
    new_peer = DisplayPeer(shown.loop, theirs)
    try:
        shown.device.attach_display(ours.detach())
        run_until(shown.loop, lambda: bool(new_peer.of(DisplayReq.UPDATE)))
        assert old_peer.sock.recv(1) == b""  # the old socket was closed
        kinds = [m.request for m in new_peer.received]
        assert kinds[:3] == [DisplayReq.GET_PROTOCOL_FEATURES,
                             DisplayReq.SET_PROTOCOL_FEATURES, DisplayReq.SCANOUT]
        assert decode(VhostUserGpuScanout, new_peer.of(DisplayReq.SCANOUT)[0].payload) == \
            VhostUserGpuScanout(0, 8, 4)
        channel = shown.device.state.scanouts.display
        assert channel is not None and channel.state is DisplayState.READY
    finally:
        new_peer.close()


def test_reset_destroys_resources_and_scanouts(shown: DeviceHarness) -> None:
    show_resource(shown, 512, 512)  # 1 MiB of the 16 MiB budget
    shown.device.reset()
    state = shown.device.state
    assert len(state.resources) == 0 and state.resources.hostmem_used == 0
    assert all(not s.enabled for s in state.scanouts.scanouts)
    shown.ok(command(Cmd.RESOURCE_CREATE_2D, ResourceCreate2d(1, 2, 2048, 2048)))


def test_removing_guest_memory_drops_backing_and_rings() -> None:
    harness = DeviceHarness()
    try:
        harness.create_2d(1, 4, 4)
        region = harness.ram.memory.regions[0]
        resource = harness.device.state.resources.get(1)
        assert resource.backing is not None
        assert harness.ram.memory.remove(MemRegion(region.gpa, region.size, region.uaddr, 0))
        assert resource.backing is None
        assert not any(queue.ready for queue in harness.device.queues)
        harness.control.publish(0)
        harness.device.process(0)  # nothing to do, nothing to crash
        assert harness.device.internal_errors == 0
    finally:
        harness.close()


def test_modes_from_the_display_feed_edid_and_num_scanouts(shown: DeviceHarness) -> None:
    peer_of(shown).modes = [DisplayOne(0, 0, 800, 600, 1, 0), DisplayOne(0, 0, 0, 0, 0, 0),
                            DisplayOne(0, 0, 640, 480, 1, 0)]
    shown.run(command(Cmd.GET_DISPLAY_INFO))
    assert shown.device.state.num_scanouts == 3
    edid = edid_of(shown, 2)
    hactive = edid[56] | (edid[58] >> 4) << 8
    vactive = edid[59] | (edid[61] >> 4) << 8
    assert (hactive, vactive) == (640, 480)
    assert shown.run(command(Cmd.SET_SCANOUT, SetScanout(0, 0, 1, 1, 2, 9))).type == \
        Resp.ERR_INVALID_RESOURCE_ID  # scanout 2 exists now


@pytest.mark.parametrize("mode", [DisplayOne(0, 0, 1024, 0, 1, 0),
                                  DisplayOne(0, 0, 70000, 800, 1, 0)],
                         ids=["zero-height", "too-wide"])
def test_odd_display_modes_still_give_an_edid(mode: DisplayOne) -> None:
    harness = DeviceHarness(display=True)
    try:
        peer_of(harness).modes = [mode]
        harness.run(command(Cmd.GET_DISPLAY_INFO))
        assert edid_of(harness, 0)
        assert harness.device.internal_errors == 0
    finally:
        harness.close()


def test_a_held_command_is_answered_when_its_ring_was_disabled_meanwhile(
        shown: DeviceHarness) -> None:
    """SET_VRING_ENABLE 0 while GET_DISPLAY_INFO waits for QEMU, then GET_VRING_BASE
    (quiesce): the answer still goes into the ring (it is mapped), not lost."""
    peer_of(shown).answer_display_info = False
    assert shown.submit(command(Cmd.GET_DISPLAY_INFO)) == []
    shown.device.queues[0].enabled = False
    shown.device.quiesce()
    assert [Resp(r.type).name for r in shown.collect()] == ["OK_DISPLAY_INFO"]


def test_the_control_queue_waits_for_the_display_negotiation() -> None:
    """Commands kicked while the display socket negotiates run once it is ready (here:
    the peer never answers GET_PROTOCOL_FEATURES, so after its timeout): QEMU sees
    SET_PROTOCOL_FEATURES before any request of theirs."""
    h = DeviceHarness(limits=Limits(max_hostmem=16 << 20, display_reply_timeout=0.2))
    try:
        ours, theirs = socket.socketpair()
        h.peer = DisplayPeer(h.loop, theirs, features=None)
        h.device.attach_display(ours.detach())
        assert h.submit(command(Cmd.GET_DISPLAY_INFO)) == []  # held
        run_until(h.loop, lambda: h.control.used_idx() == 1)
        assert [Resp(r.type).name for r in h.collect()] == ["OK_DISPLAY_INFO"]
        assert [DisplayReq(m.request) for m in h.peer.received][:3] == [
            DisplayReq.GET_PROTOCOL_FEATURES, DisplayReq.SET_PROTOCOL_FEATURES,
            DisplayReq.GET_DISPLAY_INFO]
    finally:
        h.close()


def test_quiesce_answers_what_was_popped_and_leaves_the_rest_available() -> None:
    """GET_VRING_BASE while a command holds the queue (QEMU's display has not answered)
    and another waits behind it: the first is answered (fallback), the second is not
    popped -- it stays in the avail ring for the ring's next start -- and nothing is
    pushed into the ring after it restarts (a guest reset)."""
    h = DeviceHarness(limits=Limits(max_hostmem=16 << 20, display_reply_timeout=1.0),
                      display=True)
    try:
        assert h.peer is not None
        h.peer.answer_display_info = False
        assert h.submit(command(Cmd.GET_DISPLAY_INFO)) == []
        assert h.submit(command(Cmd.GET_DISPLAY_INFO)) == []  # queued behind the first
        h.device.quiesce()
        answered = h.collect()
        assert [r.head for r in answered] == [0]
        assert h.device.queues[0].last_avail == 1
        h.device.reset()
        with pytest.raises(AssertionError, match="not met"):  # no late answer
            run_until(h.loop, lambda: h.control.used_idx() != h.control.seen_used,
                      timeout=2.0)
    finally:
        h.close()


def test_a_held_command_keeps_the_rest_of_its_batch_in_order(shown: DeviceHarness) -> None:
    """One kick, four commands, the second waiting for QEMU's display: only the first
    is answered at once; the rest stay available and run, in order, once it is done."""
    peer = peer_of(shown)
    peer.answer_display_info = False
    shown.stage(command(Cmd.RESOURCE_CREATE_2D, ResourceCreate2d(1, 2, 4, 4)))
    shown.stage(command(Cmd.GET_DISPLAY_INFO))
    shown.stage(command(Cmd.RESOURCE_CREATE_2D, ResourceCreate2d(2, 2, 4, 4)))
    shown.stage(command(Cmd.RESOURCE_CREATE_2D, ResourceCreate2d(1, 2, 4, 4)))  # in use
    shown.device.queues[0].event_idx = True
    shown.device.process(0)
    assert [r.head for r in shown.collect()] == [0]
    assert shown.device.queues[0].last_avail == 2  # the held one, not those behind it
    # the device is not done with what is available: no kick is asked for meanwhile
    assert shown.control.avail_event() == 0
    peer.close()
    run_until(shown.loop, lambda: shown.control.used_idx() == 4)
    got = shown.collect()
    assert [r.head for r in got] == [2, 4, 6]
    assert [Resp(r.type).name for r in got] == [
        "OK_DISPLAY_INFO", "OK_NODATA", "ERR_INVALID_RESOURCE_ID"]
    assert shown.control.avail_event() == 4  # all done: the next buffer is kicked


def test_a_held_queue_asks_for_the_next_kick_before_the_interrupt(
        shown: DeviceHarness, monkeypatch: pytest.MonkeyPatch) -> None:
    """Commands that hold the queue (GET_DISPLAY_INFO waits for QEMU) complete; the
    queue runs on to empty before the guest is interrupted, so a guest woken by the
    last completion already sees ``avail_event`` asking for its next buffer."""
    ring, queue = shown.control, shown.device.queues[0]
    queue.event_idx = True
    at_interrupt: list[tuple[int, int]] = []
    notify = queue.notify

    def observed_notify() -> None:
        at_interrupt.append((ring.used_idx(), ring.avail_event()))
        notify()
    monkeypatch.setattr(queue, "notify", observed_notify)
    ring.set_used_event(2)  # interrupt me when the third is used
    for _ in range(3):
        shown.stage(command(Cmd.GET_DISPLAY_INFO))
    shown.device.process(0)
    run_until(shown.loop, lambda: ring.used_idx() == 3)
    assert at_interrupt[-1] == (3, 3)
    assert [Resp(r.type).name for r in shown.collect()] == ["OK_DISPLAY_INFO"] * 3


def test_quiesce_leaves_the_rest_of_a_batch_available() -> None:
    """GET_VRING_BASE while a command holds the queue and two more came in the same
    kick: the held one is answered, the others were never consumed (the ring's base
    is right after the held one)."""
    h = DeviceHarness(limits=Limits(max_hostmem=16 << 20, display_reply_timeout=5.0),
                      display=True)
    try:
        assert h.peer is not None
        h.peer.answer_display_info = False
        for _ in range(3):
            h.stage(command(Cmd.GET_DISPLAY_INFO))
        h.device.process(0)
        assert h.collect() == []
        h.device.quiesce()
        assert [r.head for r in h.collect()] == [0]
        assert h.device.queues[0].stop() == 1
    finally:
        h.close()


def test_a_resource_lists_exactly_the_scanouts_showing_it(shown: DeviceHarness) -> None:
    """Moving a scanout to another resource, or disabling it, takes it off the resource
    it showed: unreferencing that resource later sends nothing for the scanout."""
    for resource_id in (1, 2):
        shown.create_2d(resource_id, 8, 4)
    first, second = (shown.device.state.resources.get(i) for i in (1, 2))
    shown.ok(command(Cmd.SET_SCANOUT, SetScanout(0, 0, 8, 4, 0, 1)))
    assert (first.scanouts, second.scanouts) == ({0}, set())
    shown.ok(command(Cmd.SET_SCANOUT, SetScanout(0, 0, 8, 4, 0, 2)))
    assert (first.scanouts, second.scanouts) == (set(), {0})
    peer = peer_of(shown)
    run_until(shown.loop, lambda: bool(peer.of(DisplayReq.UPDATE)))
    sent = len(peer.received)
    shown.ok(command(Cmd.RESOURCE_UNREF, ResourceUnref(1)))
    shown.ok(command(Cmd.SET_SCANOUT, SetScanout(0, 0, 0, 0, 0, 0)))
    assert second.scanouts == set()
    run_until(shown.loop, lambda: len(peer.received) > sent)
    assert [m.request for m in peer.received[sent:]] == [DisplayReq.SCANOUT]  # from disabling


def test_quiesce_answers_several_deferred_commands_in_submission_order(
        dev: DeviceHarness) -> None:
    """Commands in flight that do not hold the queue (a fenced SUBMIT_3D waits for its
    job so) are all answered when the ring stops, each with its fallback, in the order
    they came: the driver's fences complete in ring order."""
    fallbacks = iter([Resp.ERR_OUT_OF_MEMORY, Resp.ERR_INVALID_SCANOUT_ID,
                      Resp.ERR_INVALID_RESOURCE_ID])

    def never_answered(hdr: CtrlHdr, data: bytes) -> Deferred:
        code = next(fallbacks)
        return Deferred(pause=False, fallback=lambda: Reply(code))

    dev.device._handlers[_NEVER_ANSWERED] = never_answered
    for _ in range(3):
        dev.stage(command(_NEVER_ANSWERED))
    dev.device.process(CONTROL_QUEUE)
    assert dev.collect() == []  # all three in flight, none holds the queue
    dev.device.quiesce()
    assert [(r.head, Resp(r.type).name) for r in dev.collect()] == [
        (0, "ERR_OUT_OF_MEMORY"), (2, "ERR_INVALID_SCANOUT_ID"),
        (4, "ERR_INVALID_RESOURCE_ID")]
    assert dev.control.take_used() == []  # answered once only
