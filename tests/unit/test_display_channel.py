"""``DisplayChannel`` over a socketpair, with an in-process QEMU peer on the same loop."""

from __future__ import annotations

import os
import socket
import struct
import time
from collections.abc import Iterator
from dataclasses import dataclass, field

import numpy as np
import pytest

from protocol.display import (
    CURSOR_DATA_SIZE,
    DisplayFlag,
    DisplayMessage,
    DisplayReq,
    VhostUserGpuCursorPos,
    VhostUserGpuCursorUpdate,
    VhostUserGpuScanout,
    VhostUserGpuUpdate,
    encode_message,
)
from protocol.limits import Limits
from protocol.wire import decode, encode, layout
from tests.unit.display_peer import DisplayPeer
from tests.unit.loop_runner import run_a_little, run_until
from vgpu_backend.display import DisplayChannel, DisplayState
from vgpu_backend.eventloop import EventLoop

_U64 = struct.Struct("<Q")
UPDATE_HEADER = layout(VhostUserGpuUpdate).size


@dataclass
class Setup:
    loop: EventLoop
    peer: DisplayPeer
    channel: DisplayChannel
    ready: list[DisplayChannel] = field(default_factory=list)
    closed: list[DisplayChannel] = field(default_factory=list)


def make_setup(features: int | None = 3, limits: Limits | None = None,
               sndbuf: int | None = None) -> Setup:
    loop = EventLoop()
    ours, theirs = socket.socketpair()
    if sndbuf is not None:
        ours.setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
        theirs.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, sndbuf)
    peer = DisplayPeer(loop, theirs, features=features)
    ready: list[DisplayChannel] = []
    closed: list[DisplayChannel] = []
    channel = DisplayChannel(loop, ours, limits or Limits(display_reply_timeout=0.2),
                             ready.append, closed.append)
    return Setup(loop, peer, channel, ready, closed)


def state_of(channel: DisplayChannel) -> DisplayState:
    return channel.state


@pytest.fixture
def setup() -> Iterator[Setup]:
    s = make_setup()
    run_until(s.loop, lambda: s.channel.state is DisplayState.READY)
    yield s
    s.channel.close()
    s.peer.close()
    s.loop.close()


def test_negotiation(setup: Setup) -> None:
    run_until(setup.loop, lambda: len(setup.peer.received) >= 2)
    get, set_ = setup.peer.received[:2]
    assert (get.request, get.flags, get.payload) == (DisplayReq.GET_PROTOCOL_FEATURES, 0, b"")
    assert set_.request == DisplayReq.SET_PROTOCOL_FEATURES
    assert set_.u64() == 0  # we use none of the peer's features
    assert setup.channel.peer_features == 3
    assert setup.ready == [setup.channel]


def test_a_silent_peer_times_out_into_ready() -> None:
    s = make_setup(features=None, limits=Limits(display_reply_timeout=0.05))
    try:
        assert state_of(s.channel) is DisplayState.NEGOTIATING
        run_until(s.loop, lambda: bool(s.ready))
        assert state_of(s.channel) is DisplayState.READY and s.channel.peer_features == 0
        run_until(s.loop, lambda: bool(s.peer.of(DisplayReq.SET_PROTOCOL_FEATURES)))
        assert s.peer.of(DisplayReq.SET_PROTOCOL_FEATURES)[0].u64() == 0
    finally:
        s.channel.close()
        s.peer.close()
        s.loop.close()


def test_no_update_before_scanout(setup: Setup) -> None:
    pixels = np.arange(6, dtype=np.uint32).reshape(2, 3)
    setup.channel.update(0, 0, 0, pixels)
    setup.channel.scanout(1, 3, 2)
    setup.channel.update(0, 0, 0, pixels)  # scanout 0 was never announced
    run_until(setup.loop, lambda: bool(setup.peer.of(DisplayReq.SCANOUT)))
    assert setup.peer.of(DisplayReq.UPDATE) == []


def test_scanout_then_update(setup: Setup) -> None:
    pixels = np.arange(12, dtype=np.uint32).reshape(3, 4) * 0x01010101
    setup.channel.scanout(0, 8, 6)
    assert setup.channel.announced(0) == (8, 6)
    setup.channel.update(0, 2, 1, pixels[:, 1:3])  # a non-contiguous view
    run_until(setup.loop, lambda: bool(setup.peer.of(DisplayReq.UPDATE)))
    scanout = setup.peer.of(DisplayReq.SCANOUT)[0]
    assert decode(VhostUserGpuScanout, scanout.payload) == VhostUserGpuScanout(0, 8, 6)
    update = setup.peer.of(DisplayReq.UPDATE)[0]
    assert update.flags == 0
    assert decode(VhostUserGpuUpdate, update.payload) == VhostUserGpuUpdate(0, 2, 1, 2, 3)
    assert update.payload[UPDATE_HEADER:] == np.ascontiguousarray(pixels[:, 1:3]).tobytes()


def test_disabling_a_scanout_stops_updates(setup: Setup) -> None:
    setup.channel.scanout(0, 4, 4)
    setup.channel.scanout(0, 0, 0)
    assert setup.channel.announced(0) is None
    setup.channel.update(0, 0, 0, np.zeros((1, 1), np.uint32))
    run_until(setup.loop, lambda: len(setup.peer.of(DisplayReq.SCANOUT)) == 2)
    assert setup.peer.of(DisplayReq.UPDATE) == []


def test_cursor_messages(setup: Setup) -> None:
    image = np.arange(64 * 64, dtype=np.uint32).reshape(64, 64)
    setup.channel.cursor_update(0, 10, 20, 1, 2, image)
    setup.channel.cursor_move(0, 30, 40, visible=True)
    setup.channel.cursor_move(0, 50, 60, visible=False)
    run_until(setup.loop, lambda: bool(setup.peer.of(DisplayReq.CURSOR_POS_HIDE)))
    update = setup.peer.of(DisplayReq.CURSOR_UPDATE)[0]
    header = layout(VhostUserGpuCursorUpdate).size
    assert decode(VhostUserGpuCursorUpdate, update.payload) == VhostUserGpuCursorUpdate(
        0, 10, 20, 1, 2)
    assert update.payload[header:] == image.tobytes()
    assert len(update.payload) == header + CURSOR_DATA_SIZE
    pos = setup.peer.of(DisplayReq.CURSOR_POS)[0]
    hide = setup.peer.of(DisplayReq.CURSOR_POS_HIDE)[0]
    assert decode(VhostUserGpuCursorPos, pos.payload) == VhostUserGpuCursorPos(0, 30, 40)
    assert decode(VhostUserGpuCursorPos, hide.payload) == VhostUserGpuCursorPos(0, 50, 60)
    with pytest.raises(ValueError):
        setup.channel.cursor_update(0, 0, 0, 0, 0, np.zeros((32, 32), np.uint32))


def test_replies_are_matched_in_order_and_time_out(setup: Setup) -> None:
    replies: list[DisplayMessage | None] = []
    setup.peer.answer_display_info = False
    setup.channel.request(DisplayReq.GET_DISPLAY_INFO, b"", replies.append)
    run_until(setup.loop, lambda: bool(replies))
    assert replies == [None]
    setup.peer.answer_display_info = True
    setup.channel.request(DisplayReq.GET_DISPLAY_INFO, b"", replies.append)
    run_until(setup.loop, lambda: len(replies) == 2)
    reply = replies[1]
    assert reply is not None and reply.is_reply and len(reply.payload) == 408


def test_unexpected_replies_and_requests_are_ignored(setup: Setup) -> None:
    setup.peer.send(encode_message(DisplayReq.GET_EDID, b"\0" * 8, DisplayFlag.REPLY))
    setup.peer.send(encode_message(DisplayReq.SCANOUT, b"\0" * 12))
    # the code of the request about to be pending, without the REPLY flag
    setup.peer.send(encode_message(DisplayReq.GET_DISPLAY_INFO, b"\0" * 408))
    replies: list[DisplayMessage | None] = []
    setup.channel.request(DisplayReq.GET_DISPLAY_INFO, b"", replies.append)
    run_until(setup.loop, lambda: bool(replies))
    assert replies[0] is not None and replies[0].request == DisplayReq.GET_DISPLAY_INFO
    assert replies[0].is_reply and replies[0].payload != b"\0" * 408
    assert setup.channel.state is DisplayState.READY


def test_the_first_timeout_fails_the_oldest_request(setup: Setup) -> None:
    failed: list[tuple[str, DisplayMessage | None]] = []
    setup.peer.answer_display_info = False
    setup.channel.request(DisplayReq.GET_DISPLAY_INFO, b"",
                          lambda reply: failed.append(("first", reply)))
    setup.channel.request(DisplayReq.GET_DISPLAY_INFO, b"",
                          lambda reply: failed.append(("second", reply)))
    run_until(setup.loop, lambda: bool(failed))
    assert failed[0] == ("first", None)


def test_an_answered_requests_deadline_does_not_fail_the_next_one() -> None:
    """A answered, B sent later: when A's deadline passes (B's has not), B still waits
    for its own reply."""
    timeout = 1.0  # margins of 0.4 s against scheduling delays
    s = make_setup(limits=Limits(display_reply_timeout=timeout))
    try:
        run_until(s.loop, lambda: s.channel.state is DisplayState.READY)
        replies: list[DisplayMessage | None] = []
        a_sent = time.monotonic()
        s.channel.request(DisplayReq.GET_DISPLAY_INFO, b"", replies.append)
        run_until(s.loop, lambda: bool(replies))
        s.peer.answer_display_info = False
        run_until(s.loop, lambda: time.monotonic() > a_sent + timeout / 2)
        s.channel.request(DisplayReq.GET_DISPLAY_INFO, b"", replies.append)
        run_until(s.loop, lambda: time.monotonic() > a_sent + timeout * 1.1)
        assert len(replies) == 1
        s.peer.send(encode_message(DisplayReq.GET_DISPLAY_INFO, bytes(408), DisplayFlag.REPLY))
        run_until(s.loop, lambda: len(replies) == 2)
        assert replies[1] is not None and replies[1].payload == bytes(408)
    finally:
        s.channel.close()
        s.peer.close()
        s.loop.close()


def test_fds_sent_by_the_peer_are_closed(setup: Setup) -> None:
    fd = os.eventfd(0)
    before = len(os.listdir("/proc/self/fd"))
    socket.send_fds(setup.peer.sock, [encode_message(DisplayReq.SCANOUT, bytes(12))], [fd])
    os.close(fd)
    replies: list[DisplayMessage | None] = []
    setup.channel.request(DisplayReq.GET_DISPLAY_INFO, b"", replies.append)
    run_until(setup.loop, lambda: bool(replies))
    assert len(os.listdir("/proc/self/fd")) == before - 1


def test_oversized_reply_drops_the_socket(setup: Setup) -> None:
    pending: list[DisplayMessage | None] = []
    setup.peer.answer_display_info = False
    setup.channel.request(DisplayReq.GET_DISPLAY_INFO, b"", pending.append)
    setup.peer.send(struct.pack("<III", DisplayReq.GET_DISPLAY_INFO, DisplayFlag.REPLY,
                                Limits().max_display_reply + 1))
    run_until(setup.loop, lambda: setup.channel.closed)
    assert setup.closed == [setup.channel]
    assert pending == [None]


def test_peer_hang_up_closes_once_and_fails_pending_requests(setup: Setup) -> None:
    pending: list[DisplayMessage | None] = []
    setup.peer.answer_display_info = False
    setup.channel.request(DisplayReq.GET_DISPLAY_INFO, b"", pending.append)
    setup.peer.close()
    run_until(setup.loop, lambda: setup.channel.closed)
    assert pending == [None]
    assert setup.closed == [setup.channel]
    setup.channel.close()
    setup.channel.send(b"ignored")
    later: list[DisplayMessage | None] = []
    setup.channel.request(DisplayReq.GET_DISPLAY_INFO, b"", later.append)
    assert later == [None] and setup.closed == [setup.channel]


def test_a_peer_that_hangs_up_while_negotiating_never_becomes_ready() -> None:
    """The GET_PROTOCOL_FEATURES request fails with the close: the channel stays closed
    (no SET_PROTOCOL_FEATURES, no on_ready), closed once, with nothing queued."""
    s = make_setup(features=None)
    try:
        assert state_of(s.channel) is DisplayState.NEGOTIATING
        s.peer.close()
        run_until(s.loop, lambda: s.channel.closed)
        assert state_of(s.channel) is DisplayState.CLOSED
        assert s.ready == [] and s.closed == [s.channel]
        assert s.channel.backlog == 0
    finally:
        s.channel.close()
        s.loop.close()


def test_close_forgets_what_was_queued(setup: Setup) -> None:
    """Nothing queued survives the socket: the backlog is 0 at once."""
    setup.peer.pause()
    setup.channel.scanout(0, 512, 512)
    setup.channel.update(0, 0, 0, np.zeros((512, 512), np.uint32))
    assert setup.channel.backlog > 0
    setup.channel.close()
    assert setup.channel.backlog == 0


@pytest.mark.parametrize(("width", "height"), [(0, 0), (8, 0), (0, 8)])
def test_an_empty_size_disables_and_an_empty_update_is_not_sent(
        setup: Setup, width: int, height: int) -> None:
    """A SCANOUT with a zero side announces nothing (an UPDATE after it is dropped),
    and an UPDATE with a zero side is not sent even to an announced scanout."""
    setup.channel.scanout(0, width, height)
    assert setup.channel.announced(0) is None
    setup.channel.scanout(1, 8, 8)
    setup.channel.update(1, 0, 0, np.zeros((height, width), np.uint32))
    setup.channel.update(0, 0, 0, np.zeros((2, 2), np.uint32))
    run_until(setup.loop, lambda: len(setup.peer.of(DisplayReq.SCANOUT)) == 2)
    run_a_little(setup.loop)
    assert setup.peer.of(DisplayReq.UPDATE) == []


def test_large_updates_are_queued_and_drained_in_order() -> None:
    s = make_setup(sndbuf=16384)
    try:
        run_until(s.loop, lambda: s.channel.state is DisplayState.READY)
        rng = np.random.default_rng(1)
        frames = [rng.integers(0, 1 << 32, size=(256, 256), dtype=np.uint32) for _ in range(2)]
        s.channel.scanout(0, 256, 256)
        for frame in frames:
            s.channel.update(0, 0, 0, frame)
        assert s.channel.backlog > 0  # the socket could not take it all at once
        drained: list[bool] = []
        s.channel.when_drained(lambda: drained.append(True))
        run_until(s.loop, lambda: bool(drained) and len(s.peer.of(DisplayReq.UPDATE)) == 2)
        assert s.channel.backlog == 0
        got = [m.payload[UPDATE_HEADER:] for m in s.peer.of(DisplayReq.UPDATE)]
        assert got == [f.tobytes() for f in frames]
        now: list[bool] = []
        s.channel.when_drained(lambda: now.append(True))
        assert now == [True]
    finally:
        s.channel.close()
        s.peer.close()
        s.loop.close()


def test_scanout_payload_bytes(setup: Setup) -> None:
    setup.channel.scanout(2, 1280, 800)
    run_until(setup.loop, lambda: bool(setup.peer.of(DisplayReq.SCANOUT)))
    assert setup.peer.of(DisplayReq.SCANOUT)[0].payload == encode(
        VhostUserGpuScanout(2, 1280, 800)) == bytes.fromhex("020000000005000020030000")
