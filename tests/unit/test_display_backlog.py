"""A QEMU that reads the display socket slowly: what the guest sends meanwhile is held,
bounded by the number of scanouts, and the latest state reaches QEMU once it reads
again (damage merged, sizes announced before their updates, the cursor's last image and
position)."""

from __future__ import annotations

import contextlib
import dataclasses
import select
import socket
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from protocol.display import (
    DisplayReq,
    VhostUserGpuCursorPos,
    VhostUserGpuCursorUpdate,
    VhostUserGpuScanout,
    VhostUserGpuUpdate,
)
from protocol.limits import Limits
from protocol.virtio_gpu import ResourceFlush, SetScanout, UpdateCursor
from protocol.virtio_gpu_codes import Cmd
from protocol.wire import decode
from tests.unit.device_harness import TWO_D_ONLY, DeviceHarness, command
from tests.unit.display_peer import DisplayPeer
from tests.unit.loop_runner import run_a_little, run_until
from vgpu_backend.display import DisplayChannel, DisplayState
from vgpu_backend.eventloop import EventLoop
from vgpu_backend.scanout import ScanoutManager

QUEUE_LIMIT = 64 << 10
SIZE = 512  # a full update of the test resource: 1 MiB, beyond what the socket buffers
COMMANDS = 3000


@contextlib.contextmanager
def display_behind(queue_limit: int, outputs: int = 1
                   ) -> Iterator[tuple[DeviceHarness, DisplayPeer, DisplayChannel]]:
    """A device with ``outputs`` scanouts whose display socket takes 16 KiB at a time,
    a 512x512 resource 1 and a 64x64 cursor resource 2; at the end no bug of ours may
    have been met."""
    harness = DeviceHarness(Limits(max_hostmem=16 << 20, display_queue_bytes=queue_limit),
                            dataclasses.replace(TWO_D_ONLY, max_outputs=outputs),
                            display=True, display_send_buffer=16 << 10)
    peer, channel = harness.peer, harness.device.state.scanouts.display
    assert peer is not None and channel is not None
    try:
        harness.create_2d(1, SIZE, SIZE)
        harness.create_2d(2, 64, 64)
        yield harness, peer, channel
        assert harness.device.internal_errors == 0
    finally:
        harness.close()


@pytest.fixture
def slow() -> Iterator[tuple[DeviceHarness, DisplayPeer, DisplayChannel]]:
    """Resource 1 shown, a second cursor resource 3, and a display peer that has
    stopped reading with the back-end's queue beyond its limit."""
    with display_behind(QUEUE_LIMIT) as (harness, peer, channel):
        harness.create_2d(3, 64, 64)
        peer.pause()
        harness.ok(command(Cmd.SET_SCANOUT, SetScanout(0, 0, SIZE, SIZE, 0, 1)))
        assert channel.backlog > QUEUE_LIMIT
        yield harness, peer, channel


def read_until(harness: DeviceHarness, peer: DisplayPeer, channel: DisplayChannel,
               done: Callable[[], bool]) -> None:
    """QEMU reads what the socket holds, now and then, until ``done()``."""
    while not done():
        peer.read_once()
        moved = channel.backlog

        def progress(before: int = moved) -> bool:
            return channel.backlog != before or done()
        run_until(harness.loop, progress)


def caught_up(harness: DeviceHarness, peer: DisplayPeer, channel: DisplayChannel) -> None:
    """QEMU reads again, until the back-end's queue and the socket are empty."""
    peer.resume()
    run_until(harness.loop, lambda: channel.backlog == 0
              and not select.select([peer.sock], [], [], 0)[0])


def test_cursor_flood_is_held_as_its_latest_state(
        slow: tuple[DeviceHarness, DisplayPeer, DisplayChannel]) -> None:
    harness, peer, channel = slow
    backlog = channel.backlog
    for i in range(COMMANDS):
        resource = 2 + i % 2
        harness.cursor_command(command(Cmd.UPDATE_CURSOR,
                                       UpdateCursor(0, i, i, 0, resource, 1, 2)))
        harness.cursor_command(command(Cmd.MOVE_CURSOR, UpdateCursor(0, i, i + 7, 0, 2, 0, 0)))
    assert channel.backlog == backlog  # nothing more was queued
    caught_up(harness, peer, channel)
    updates = peer.of(DisplayReq.CURSOR_UPDATE)
    moves = peer.of(DisplayReq.CURSOR_POS)
    assert len(updates) == 1 and len(moves) == 1
    last = COMMANDS - 1
    assert decode(VhostUserGpuCursorUpdate, updates[0].payload) == \
        VhostUserGpuCursorUpdate(0, last, last, 1, 2)
    assert decode(VhostUserGpuCursorPos, moves[0].payload) == \
        VhostUserGpuCursorPos(0, last, last + 7)
    assert peer.received.index(updates[0]) < peer.received.index(moves[0])


def test_the_cursor_waits_while_the_held_damage_backs_the_socket_up_again() -> None:
    """Three scanouts' damage is held with a cursor move; the first drain sends what
    fits, finds the socket backed up again on the third scanout, and keeps the cursor
    for the next drain: it never overtakes held damage."""
    with display_behind(QUEUE_LIMIT, outputs=3) as (harness, peer, channel):
        for scanout in range(3):
            harness.ok(command(Cmd.SET_SCANOUT, SetScanout(0, 0, SIZE, SIZE, scanout, 1)))
        caught_up(harness, peer, channel)
        peer.pause()
        harness.ok(command(Cmd.RESOURCE_FLUSH, ResourceFlush(0, 0, SIZE, SIZE, 1)))
        assert channel.backlog > QUEUE_LIMIT  # scanout 0's update; 1 and 2 are held
        harness.cursor_command(command(Cmd.MOVE_CURSOR, UpdateCursor(0, 5, 6, 0, 2, 0, 0)))
        seen = len(peer.received)
        caught_up(harness, peer, channel)
        sent = [(DisplayReq(m.request), decode(VhostUserGpuUpdate, m.payload).scanout_id
                 if m.request == DisplayReq.UPDATE else None) for m in peer.received[seen:]]
        assert sent[-1] == (DisplayReq.CURSOR_POS, None)
        assert {scanout for req, scanout in sent if req == DisplayReq.UPDATE} == {0, 1, 2}


def test_scanout_churn_is_held_as_the_latest_size(
        slow: tuple[DeviceHarness, DisplayPeer, DisplayChannel]) -> None:
    harness, peer, channel = slow
    backlog = channel.backlog
    rects = [(0, 0, SIZE, SIZE), (8, 8, 100, 50)]
    for i in range(COMMANDS):
        x, y, w, h = rects[i % 2]
        harness.ok(command(Cmd.SET_SCANOUT, SetScanout(x, y, w, h, 0, 1)))
    assert channel.backlog == backlog
    assert len(channel._drained) <= 1  # one drain callback, not thousands
    caught_up(harness, peer, channel)
    x, y, w, h = rects[(COMMANDS - 1) % 2]
    scanouts = [decode(VhostUserGpuScanout, m.payload)
                for m in peer.of(DisplayReq.SCANOUT)]
    assert scanouts == [VhostUserGpuScanout(0, SIZE, SIZE), VhostUserGpuScanout(0, w, h)]
    last_update = decode(VhostUserGpuUpdate, peer.of(DisplayReq.UPDATE)[-1].payload)
    assert last_update == VhostUserGpuUpdate(0, 0, 0, w, h)
    assert_no_update_beyond_its_scanout(peer)


def test_damage_is_merged_and_sent_after_the_size(
        slow: tuple[DeviceHarness, DisplayPeer, DisplayChannel]) -> None:
    harness, peer, channel = slow
    harness.ok(command(Cmd.SET_SCANOUT, SetScanout(0, 0, 128, 128, 0, 1)))
    for x, y in ((10, 10), (40, 90), (100, 20)):
        harness.ok(command(Cmd.RESOURCE_FLUSH, ResourceFlush(x, y, 8, 8, 1)))
    caught_up(harness, peer, channel)
    updates = [decode(VhostUserGpuUpdate, m.payload) for m in peer.of(DisplayReq.UPDATE)]
    # the first full update was queued before QEMU stopped reading; then one update
    # for the new size (the whole scanout: it holds the flushes' damage too)
    assert updates == [VhostUserGpuUpdate(0, 0, 0, SIZE, SIZE),
                       VhostUserGpuUpdate(0, 0, 0, 128, 128)]
    assert_no_update_beyond_its_scanout(peer)
    harness.ok(command(Cmd.RESOURCE_FLUSH, ResourceFlush(10, 10, 8, 8, 1)))
    harness.ok(command(Cmd.RESOURCE_FLUSH, ResourceFlush(40, 90, 8, 8, 1)))
    run_until(harness.loop, lambda: len(peer.of(DisplayReq.UPDATE)) == 4)  # not held now


@pytest.mark.parametrize("flushes, merged", [
    ([(32, 0, 32, 32), (0, 0, 1, 1)], (0, 0, 1, 1)),  # touching the scanout: no damage
    ([(0, 32, 32, 32), (0, 0, 1, 1)], (0, 0, 1, 1)),
    ([(20, 0, 4, 4), (2, 0, 4, 4)], (2, 0, 22, 4)),  # the bounding box, either order
    ([(2, 0, 4, 4), (20, 0, 4, 4)], (2, 0, 22, 4)),
    ([(0, 20, 4, 4), (0, 2, 4, 4)], (0, 2, 4, 22)),
    ([(0, 2, 4, 4), (0, 20, 4, 4)], (0, 2, 4, 22)),
])
def test_damage_held_is_the_bounding_box_of_what_overlaps_the_scanout(
        flushes: list[tuple[int, int, int, int]], merged: tuple[int, int, int, int]) -> None:
    """Scanout 1 shows (0, 0, 32, 32) of a 64x64 resource; scanout 0's frame backs the
    socket up; the flushes of the resource meanwhile reach QEMU as one UPDATE."""
    with display_behind(QUEUE_LIMIT, outputs=2) as (harness, peer, channel):
        harness.create_2d(3, 64, 64)
        harness.ok(command(Cmd.SET_SCANOUT, SetScanout(0, 0, 32, 32, 1, 3)))
        caught_up(harness, peer, channel)
        peer.pause()
        harness.ok(command(Cmd.SET_SCANOUT, SetScanout(0, 0, SIZE, SIZE, 0, 1)))
        for rect in flushes:
            harness.ok(command(Cmd.RESOURCE_FLUSH, ResourceFlush(*rect, 3)))
        caught_up(harness, peer, channel)
        updates = [decode(VhostUserGpuUpdate, m.payload) for m in peer.of(DisplayReq.UPDATE)]
        assert [u for u in updates if u.scanout_id == 1] == [
            VhostUserGpuUpdate(1, 0, 0, 32, 32), VhostUserGpuUpdate(1, *merged)]


def test_a_backlog_at_the_limit_is_not_behind() -> None:
    """With exactly ``queue_limit`` bytes queued a cursor move still goes out at once;
    one byte more and it is held."""
    loop = EventLoop()
    ours, theirs = socket.socketpair()
    peer = DisplayPeer(loop, theirs)
    channel = DisplayChannel(loop, ours, Limits(), lambda _: None, lambda _: None)
    try:
        run_until(loop, lambda: channel.state is DisplayState.READY)
        peer.pause()
        channel.scanout(0, SIZE, SIZE)
        channel.update(0, 0, 0, np.zeros((SIZE, SIZE), np.uint32))
        queued = channel.backlog
        assert queued > 0  # the socket is full: what is sent now stays queued
        for limit, sent in ((queued - 1, False), (queued, True)):
            scanouts = ScanoutManager(1, queue_limit=limit)
            scanouts.display = channel
            before = channel.backlog
            scanouts.cursor_move(0, 1, 2, visible=True)
            assert (channel.backlog > before) is sent, limit
    finally:
        channel.close()
        peer.close()
        loop.close()


def assert_no_update_beyond_its_scanout(peer: DisplayPeer) -> None:
    """Every UPDATE fits the surface the last SCANOUT of its scanout announced."""
    sizes: dict[int, tuple[int, int]] = {}
    for message in peer.received:
        if message.request == DisplayReq.SCANOUT:
            scanout = decode(VhostUserGpuScanout, message.payload)
            sizes[scanout.scanout_id] = (scanout.width, scanout.height)
        elif message.request == DisplayReq.UPDATE:
            update = decode(VhostUserGpuUpdate, message.payload)
            width, height = sizes.get(update.scanout_id, (0, 0))
            assert update.x + update.width <= width and update.y + update.height <= height


def test_what_is_held_is_not_overtaken_before_the_queue_empties(
        slow: tuple[DeviceHarness, DisplayPeer, DisplayChannel]) -> None:
    """Below the limit but with the queue not yet empty, a new cursor position waits
    behind the held one instead of going out first."""
    harness, peer, channel = slow
    harness.cursor_command(command(Cmd.MOVE_CURSOR, UpdateCursor(0, 5, 5, 0, 2, 0, 0)))
    read_until(harness, peer, channel, lambda: channel.backlog <= QUEUE_LIMIT // 2)
    assert channel.backlog > 0 and not peer.of(DisplayReq.CURSOR_POS)
    harness.cursor_command(command(Cmd.MOVE_CURSOR, UpdateCursor(0, 8, 8, 0, 2, 0, 0)))
    caught_up(harness, peer, channel)
    moves = [decode(VhostUserGpuCursorPos, m.payload) for m in peer.of(DisplayReq.CURSOR_POS)]
    assert moves == [VhostUserGpuCursorPos(0, 8, 8)]


def test_every_new_size_is_followed_by_its_update() -> None:
    """Two scanouts; scanout 0's held frame backs the socket up again while the held
    state is sent: scanout 1's new size waits for its own UPDATE (a SCANOUT without
    one leaks QEMU's surface when the next SCANOUT comes)."""
    with display_behind(QUEUE_LIMIT, outputs=2) as (harness, peer, channel):
        harness.ok(command(Cmd.SET_SCANOUT, SetScanout(0, 0, 64, 64, 1, 2)))
        caught_up(harness, peer, channel)
        peer.pause()
        harness.ok(command(Cmd.SET_SCANOUT, SetScanout(0, 0, SIZE, SIZE, 0, 1)))
        harness.ok(command(Cmd.RESOURCE_FLUSH, ResourceFlush(0, 0, SIZE, SIZE, 1)))
        harness.ok(command(Cmd.SET_SCANOUT, SetScanout(0, 0, 32, 32, 1, 2)))
        # QEMU reads until the queue empties and the held state refills it: scanout 0's
        # frame backs it up again before scanout 1's turn
        last_seen = channel.backlog

        def refilled() -> bool:
            nonlocal last_seen
            grew, last_seen = channel.backlog > last_seen, channel.backlog
            return grew
        read_until(harness, peer, channel, refilled)
        harness.ok(command(Cmd.SET_SCANOUT, SetScanout(0, 0, 16, 16, 1, 2)))
        caught_up(harness, peer, channel)
        assert_no_update_beyond_its_scanout(peer)
        last: dict[int, DisplayReq] = {}
        for message in peer.received:
            if message.request not in (DisplayReq.SCANOUT, DisplayReq.UPDATE):
                continue
            scanout = decode(VhostUserGpuScanout, message.payload[:12])
            if message.request == DisplayReq.SCANOUT and scanout.width:
                assert last.get(scanout.scanout_id) != DisplayReq.SCANOUT, \
                    f"two SCANOUTs of scanout {scanout.scanout_id} without an UPDATE"
            last[scanout.scanout_id] = DisplayReq(message.request)
        final = [decode(VhostUserGpuScanout, m.payload) for m in peer.of(DisplayReq.SCANOUT)
                 if decode(VhostUserGpuScanout, m.payload).scanout_id == 1][-1]
        assert (final.width, final.height) == (16, 16)


def test_a_new_socket_gets_the_held_state(
        slow: tuple[DeviceHarness, DisplayPeer, DisplayChannel]) -> None:
    """VM stop/cont while QEMU was behind: the new display socket is told each scanout's
    size, its whole picture, and the cursor's latest state; the old drain callback is
    gone with the old socket."""
    harness, old_peer, _ = slow
    harness.cursor_command(command(Cmd.UPDATE_CURSOR, UpdateCursor(0, 3, 4, 0, 2, 1, 1)))
    harness.cursor_command(command(Cmd.MOVE_CURSOR, UpdateCursor(0, 9, 9, 0, 2, 0, 0)))
    ours, theirs = socket.socketpair()
    peer = DisplayPeer(harness.loop, theirs)
    harness.device.attach_display(ours.detach())
    channel = harness.device.state.scanouts.display
    assert channel is not None
    run_until(harness.loop, lambda: channel.backlog == 0 and
              len(peer.of(DisplayReq.CURSOR_POS)) == 1)
    assert [decode(VhostUserGpuScanout, m.payload) for m in peer.of(DisplayReq.SCANOUT)] \
        == [VhostUserGpuScanout(0, SIZE, SIZE)]
    assert [decode(VhostUserGpuUpdate, m.payload) for m in peer.of(DisplayReq.UPDATE)] \
        == [VhostUserGpuUpdate(0, 0, 0, SIZE, SIZE)]
    assert decode(VhostUserGpuCursorUpdate, peer.of(DisplayReq.CURSOR_UPDATE)[0].payload) \
        == VhostUserGpuCursorUpdate(0, 3, 4, 1, 1)
    assert decode(VhostUserGpuCursorPos, peer.of(DisplayReq.CURSOR_POS)[0].payload) == \
        VhostUserGpuCursorPos(0, 9, 9)
    peer.close()
    old_peer.close()


# --- property: any sequence, any reading pace --------------------------------------

RECTS = {1: [(0, 0, SIZE, SIZE), (8, 8, 100, 50)], 4: [(0, 0, 128, 96), (4, 4, 32, 32)]}
FRAME = SIZE * SIZE * 4
Step = tuple[Any, ...]  # ("kind", fields...) as STEPS draws them
STEPS = st.one_of(
    st.tuples(st.just("show"), st.integers(0, 1), st.sampled_from([1, 4]), st.integers(0, 1)),
    st.tuples(st.just("disable"), st.integers(0, 1)),
    st.tuples(st.just("flush"), st.sampled_from([1, 4]), st.integers(0, 60),
              st.integers(0, 40)),
    st.tuples(st.just("image"), st.integers(0, 500), st.integers(0, 500)),
    st.tuples(st.just("move"), st.integers(0, 500), st.integers(0, 500), st.booleans()),
    st.tuples(st.just("read"), st.sampled_from([1, 4, 16])),
    st.tuples(st.just("read below the limit")),
)


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(steps=st.lists(STEPS, min_size=1, max_size=60))
@example(steps=[("show", 0, 1, 0), ("move", 5, 5, True), ("read below the limit",),
                ("move", 8, 8, True)])  # a held position overtaken (found by review)
def test_any_sequence_at_any_reading_pace(steps: list[Step]) -> None:
    """Two scanouts, a QEMU that reads only now and then: the queue stays within the
    limit plus one frame; no UPDATE exceeds its surface or comes before it; no surface
    is announced twice without an UPDATE between; once QEMU catches up it has every
    scanout's size and picture and the cursor's last image and position."""
    with display_behind(FRAME // 2, outputs=2) as (harness, peer, channel):
        harness.create_2d(4, 128, 96)
        peer.pause()
        shown: dict[int, tuple[int, int]] = {}  # scanout -> size
        cursor: list[tuple[DisplayReq, tuple[int, ...]]] = []
        for step in steps:
            run_step(harness, peer, step, shown, cursor)
            assert channel.backlog <= FRAME // 2 + FRAME + (64 << 10)
        caught_up(harness, peer, channel)
        assert_no_update_beyond_its_scanout(peer)
        announced: dict[int, tuple[int, int]] = {}
        drawn: dict[int, bool] = {}
        for message in peer.received:
            if message.request == DisplayReq.SCANOUT:
                scanout = decode(VhostUserGpuScanout, message.payload)
                size = (scanout.width, scanout.height)
                if size != (0, 0):
                    assert drawn.get(scanout.scanout_id, True), "two SCANOUTs, no UPDATE"
                announced[scanout.scanout_id] = size
                drawn[scanout.scanout_id] = size == (0, 0)
            elif message.request == DisplayReq.UPDATE:
                drawn[decode(VhostUserGpuUpdate, message.payload).scanout_id] = True
        for index in (0, 1):
            assert announced.get(index, (0, 0)) == shown.get(index, (0, 0))
            assert drawn.get(index, True)
        if cursor:
            assert last_cursor_state(peer) == cursor_state(cursor)


def run_step(harness: DeviceHarness, peer: DisplayPeer, step: Step,
             shown: dict[int, tuple[int, int]],
             cursor: list[tuple[DisplayReq, tuple[int, ...]]]) -> None:
    """Do ``step`` and keep the model (``shown`` sizes, commanded cursor messages)."""
    kind = step[0]
    if kind == "show":
        _, index, resource, choice = step
        x, y, w, h = RECTS[int(resource)][int(choice)]
        harness.ok(command(Cmd.SET_SCANOUT, SetScanout(x, y, w, h, index, resource)))
        shown[int(index)] = (w, h)
    elif kind == "disable":
        harness.ok(command(Cmd.SET_SCANOUT, SetScanout(0, 0, 0, 0, step[1], 0)))
        shown.pop(int(step[1]), None)
    elif kind == "flush":
        _, resource, x, y = step
        harness.ok(command(Cmd.RESOURCE_FLUSH, ResourceFlush(x, y, 30, 20, resource)))
    elif kind == "image":
        harness.cursor_command(command(Cmd.UPDATE_CURSOR,
                                       UpdateCursor(0, step[1], step[2], 0, 2, 1, 1)))
        cursor.append((DisplayReq.CURSOR_UPDATE, (step[1], step[2])))
    elif kind == "move":
        visible = bool(step[3])
        harness.cursor_command(command(Cmd.MOVE_CURSOR, UpdateCursor(
            0, step[1], step[2], 0, 2 if visible else 0, 0, 0)))
        cursor.append((DisplayReq.CURSOR_POS if visible else DisplayReq.CURSOR_POS_HIDE,
                       (step[1], step[2])))
    elif kind == "read below the limit":  # QEMU is about to catch up, not quite yet
        channel = harness.device.state.scanouts.display
        assert channel is not None
        limit = harness.limits.display_queue_bytes
        while channel.backlog > limit // 2:
            peer.read_once()
            run_a_little(harness.loop)
    else:  # QEMU reads what the socket holds, a few times; the back-end refills it
        for _ in range(step[1]):
            peer.read_once()
            run_a_little(harness.loop)


def cursor_state(messages: list[tuple[DisplayReq, tuple[int, ...]]]
                 ) -> tuple[int, tuple[int, ...], bool]:
    """(index of the last image, last position, visible) after ``messages``."""
    image, visible = -1, False
    position: tuple[int, ...] = (0, 0)
    for index, (request, where) in enumerate(messages):
        if request == DisplayReq.CURSOR_UPDATE:
            image = index
        position, visible = where, request != DisplayReq.CURSOR_POS_HIDE
    return (image if image < 0 else messages[image][1][0], position, visible)


def last_cursor_state(peer: DisplayPeer) -> tuple[int, tuple[int, ...], bool]:
    """The same, from what QEMU received."""
    seen: list[tuple[DisplayReq, tuple[int, ...]]] = []
    for message in peer.received:
        request = DisplayReq(message.request)
        if request in (DisplayReq.CURSOR_UPDATE, DisplayReq.CURSOR_POS,
                       DisplayReq.CURSOR_POS_HIDE):
            pos = decode(VhostUserGpuCursorPos, message.payload[:12])
            seen.append((request, (pos.x, pos.y)))
    return cursor_state(seen)


def test_the_cursor_waits_for_the_first_sockets_negotiation() -> None:
    """The first display socket, nothing queued before: cursor messages sent while QEMU
    has not answered GET_PROTOCOL_FEATURES wait for the features to be agreed, then go
    out in order."""
    harness = DeviceHarness()
    ours, theirs = socket.socketpair()
    peer = DisplayPeer(harness.loop, theirs, features=None)  # silent for now
    try:
        harness.create_2d(2, 64, 64)
        harness.device.attach_display(ours.detach())
        run_until(harness.loop, lambda: bool(peer.of(DisplayReq.GET_PROTOCOL_FEATURES)))
        harness.cursor_command(command(Cmd.UPDATE_CURSOR, UpdateCursor(0, 1, 2, 0, 2, 0, 0)))
        harness.cursor_command(command(Cmd.MOVE_CURSOR, UpdateCursor(0, 3, 4, 0, 2, 0, 0)))
        run_a_little(harness.loop)
        peer.answer_features(0)
        run_until(harness.loop, lambda: bool(peer.of(DisplayReq.CURSOR_POS)))
        harness.cursor_command(command(Cmd.MOVE_CURSOR, UpdateCursor(0, 5, 6, 0, 2, 0, 0)))
        run_until(harness.loop, lambda: len(peer.of(DisplayReq.CURSOR_POS)) == 2)
        assert [DisplayReq(m.request) for m in peer.received] == [
            DisplayReq.GET_PROTOCOL_FEATURES, DisplayReq.SET_PROTOCOL_FEATURES,
            DisplayReq.CURSOR_UPDATE, DisplayReq.CURSOR_POS, DisplayReq.CURSOR_POS]
        assert [decode(VhostUserGpuCursorPos, m.payload)
                for m in peer.of(DisplayReq.CURSOR_POS)] == \
            [VhostUserGpuCursorPos(0, 3, 4), VhostUserGpuCursorPos(0, 5, 6)]
        assert harness.device.internal_errors == 0
    finally:
        peer.close()
        harness.close()


def test_the_cursor_waits_for_a_new_sockets_negotiation(
        slow: tuple[DeviceHarness, DisplayPeer, DisplayChannel]) -> None:
    """A new display socket whose QEMU has not answered GET_PROTOCOL_FEATURES yet gets
    no cursor message before the features are agreed; then the latest one."""
    harness, old_peer, _ = slow
    ours, theirs = socket.socketpair()
    peer = DisplayPeer(harness.loop, theirs, features=None)  # silent for now
    harness.device.attach_display(ours.detach())
    run_until(harness.loop, lambda: bool(peer.of(DisplayReq.GET_PROTOCOL_FEATURES)))
    harness.cursor_command(command(Cmd.MOVE_CURSOR, UpdateCursor(0, 1, 2, 0, 2, 0, 0)))
    harness.cursor_command(command(Cmd.MOVE_CURSOR, UpdateCursor(0, 3, 4, 0, 2, 0, 0)))
    run_a_little(harness.loop)
    assert [DisplayReq(m.request) for m in peer.received] == \
        [DisplayReq.GET_PROTOCOL_FEATURES]
    peer.answer_features(0)
    run_until(harness.loop, lambda: bool(peer.of(DisplayReq.CURSOR_POS)))
    requests = [DisplayReq(m.request) for m in peer.received]
    assert requests.index(DisplayReq.SET_PROTOCOL_FEATURES) < \
        requests.index(DisplayReq.CURSOR_POS)
    assert [decode(VhostUserGpuCursorPos, m.payload) for m in peer.of(DisplayReq.CURSOR_POS)] \
        == [VhostUserGpuCursorPos(0, 3, 4)]
    peer.close()
    old_peer.close()
