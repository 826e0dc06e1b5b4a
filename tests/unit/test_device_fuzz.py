"""Hostile guests: arbitrary command bytes and corrupt rings against the device.

Whatever the guest sends, every chain gets a well-formed response header (or the
ring is marked broken when the ring itself is corrupt), no handler fails with an
internal error, and the device keeps serving valid commands afterwards.
"""

from __future__ import annotations

import select
import struct
from typing import Any

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.display import (
    DisplayMessage,
    DisplayReq,
    VhostUserGpuScanout,
    VhostUserGpuUpdate,
)
from protocol.virtio_gpu import (
    CTRL_HDR_SIZE,
    GetEdid,
    MemEntry,
    ResourceAttachBacking,
    ResourceCreate2d,
    ResourceFlush,
    ResourceUnref,
    SetScanout,
    TransferToHost2d,
)
from protocol.virtio_gpu_codes import Cmd, CtrlFlag, Resp
from protocol.wire import decode, encode, layout
from tests.unit.device_harness import (
    BACKING_BASE,
    BACKING_END,
    DeviceHarness,
    Response,
    command,
)
from tests.unit.driver_ring import pack_desc
from tests.unit.hang_guard import deadline
from tests.unit.loop_runner import run_until
from vgpu_backend.device_state import DeviceOptions

#: response type -> total size of a complete response
RESPONSE_SIZES = {Resp.OK_NODATA: 24, Resp.OK_DISPLAY_INFO: 408, Resp.OK_EDID: 1056,
                  Resp.OK_CAPSET_INFO: 40, Resp.OK_RESOURCE_UUID: 40, Resp.OK_MAP_INFO: 32}
FENCE_FLAGS = int(CtrlFlag.FENCE | CtrlFlag.INFO_RING_IDX)
UPDATE_HEADER = layout(VhostUserGpuUpdate).size

IDS = st.sampled_from([1, 1, 1, 2, 0, 3])
SMALL = st.one_of(st.integers(0, 70), st.sampled_from([0xFFFF_FFFF, 16384, 16385, 4096]))
U64S = st.one_of(st.integers(0, 4096), st.just((1 << 64) - 1))


def entry_bytes() -> st.SearchStrategy[bytes]:
    addr = st.one_of(st.integers(BACKING_BASE // 4096, BACKING_END // 4096 - 1).map(
        lambda page: page * 4096), st.integers(0, (1 << 64) - 1))
    length = st.one_of(st.sampled_from([0, 1, 4096, 8192, 3 * 4096 + 7]),
                       st.integers(0, 0xFFFF_FFFF))
    return st.lists(st.builds(lambda a, n: encode(MemEntry(a, n)), addr, length),
                    max_size=6).map(b"".join)


@st.composite
def rects(draw: st.DrawFn) -> tuple[int, int, int, int]:
    """Rectangles inside the 64x32 resource 1, on or one past its edges, or anything."""
    kind = draw(st.integers(0, 3))
    if kind == 0:
        return (draw(SMALL), draw(SMALL), draw(SMALL), draw(SMALL))
    x, y = draw(st.integers(0, 63)), draw(st.integers(0, 31))
    if kind == 3:  # ends at the edge or one beyond it
        return x, y, 64 - x + draw(st.integers(0, 1)), 32 - y + draw(st.integers(0, 1))
    return x, y, draw(st.integers(0, 64 - x)), draw(st.integers(0, 32 - y))


def record_body(cls: type[Any], *fields: st.SearchStrategy[Any]) -> st.SearchStrategy[bytes]:
    return st.builds(lambda *values: encode(cls(*values)), *fields)


#: plausible bodies per command, so fuzzing gets past the first checks
BODIES: dict[int, st.SearchStrategy[bytes]] = {
    Cmd.RESOURCE_CREATE_2D: record_body(ResourceCreate2d, IDS,
                                        st.sampled_from([1, 2, 3, 4, 67, 68, 121, 134, 0, 5]),
                                        SMALL, SMALL),
    Cmd.RESOURCE_UNREF: record_body(ResourceUnref, IDS, st.just(0)),
    Cmd.RESOURCE_ATTACH_BACKING: st.builds(
        lambda rid, count, entries: encode(ResourceAttachBacking(rid, count)) + entries,
        IDS, st.one_of(st.integers(0, 7), st.integers(0, 0xFFFF_FFFF)), entry_bytes()),
    Cmd.TRANSFER_TO_HOST_2D: st.builds(
        lambda r, offset, rid: encode(TransferToHost2d._make((*r, offset, rid, 0))),
        rects(), U64S, IDS),
    Cmd.SET_SCANOUT: st.builds(lambda r, sid, rid: encode(SetScanout._make((*r, sid, rid))),
                               rects(), st.integers(0, 1), IDS),
    Cmd.RESOURCE_FLUSH: st.builds(lambda r, rid: encode(ResourceFlush._make((*r, rid, 0))),
                                  rects(), IDS),
    Cmd.GET_EDID: record_body(GetEdid, IDS, st.just(0)),
}

#: the commands that move pixels count three times
TWO_D = [*BODIES, Cmd.GET_DISPLAY_INFO, Cmd.RESOURCE_DETACH_BACKING,
         Cmd.RESOURCE_ASSIGN_UUID, Cmd.GET_CAPSET_INFO, Cmd.GET_CAPSET,
         *[Cmd.TRANSFER_TO_HOST_2D, Cmd.SET_SCANOUT, Cmd.RESOURCE_FLUSH] * 2]


@st.composite
def command_types(draw: st.DrawFn) -> int:
    """Mostly 2D commands, then any command, then any number."""
    kind = draw(st.integers(0, 9))
    if kind < 7:
        return int(draw(st.sampled_from(TWO_D)))
    if kind < 9:
        return int(draw(st.sampled_from(list(Cmd))))
    return draw(st.integers(0, 0xFFFF_FFFF))


@st.composite
def guest_commands(draw: st.DrawFn) -> bytes:
    """A header with a random type and fence, and a plausible, random or cut body."""
    cmd = draw(command_types())
    flags = draw(st.one_of(st.integers(0, 3), st.integers(0, 0xFFFF_FFFF)))
    header = struct.pack("<IIQIB3s", cmd, flags, draw(st.integers(0, (1 << 64) - 1)),
                         draw(st.integers(0, 0xFFFF_FFFF)), draw(st.integers(0, 255)),
                         draw(st.binary(min_size=3, max_size=3)))
    plausible = draw(st.integers(0, 9)) < 8 and cmd in BODIES
    body = draw(BODIES[cmd] if plausible else st.binary(max_size=128))
    raw = header + body
    if draw(st.integers(0, 9)) == 0:  # truncated, possibly inside the header
        raw = raw[:draw(st.integers(1, len(raw)))]
    return raw


def check_response(response: Response, request: bytes) -> None:
    """A well-formed response header answering ``request``."""
    assert response.written >= CTRL_HDR_SIZE
    hdr = response.hdr
    resp = Resp(hdr.type)  # a known response code
    expected_size = RESPONSE_SIZES.get(resp, CTRL_HDR_SIZE)
    if resp is not Resp.OK_CAPSET:
        assert response.written == expected_size, (resp.name, response.written)
    assert hdr.padding == b"\0\0\0"
    if len(request) >= CTRL_HDR_SIZE:
        req_flags, req_fence, req_ctx, req_ring = struct.unpack_from("<4xIQIB", request)
        if req_flags & CtrlFlag.FENCE:
            assert (hdr.flags, hdr.fence_id, hdr.ctx_id) == (
                req_flags & FENCE_FLAGS, req_fence, req_ctx)
            assert hdr.ring_idx == (req_ring if req_flags & CtrlFlag.INFO_RING_IDX else 0)
            return
    assert (hdr.flags, hdr.fence_id, hdr.ctx_id, hdr.ring_idx) == (0, 0, 0, 0)


def with_resources(harness: DeviceHarness) -> DeviceHarness:
    """Resource 1 (64x32, with more backing than it needs) shown at an offset on
    scanout 0, and resource 2 (16x16 RGBA, no backing)."""
    harness.create_2d(1, 64, 32, backing_gpa=None)
    harness.ok(command(Cmd.RESOURCE_ATTACH_BACKING, encode(ResourceAttachBacking(1, 1))
                       + encode(MemEntry(BACKING_BASE, 64 * 32 * 4 + 65536))))
    harness.create_2d(2, 16, 16, fmt=67, backing_gpa=None)
    harness.ok(command(Cmd.SET_SCANOUT, encode(SetScanout(8, 4, 40, 20, 0, 1))))
    return harness


def assert_still_serving(harness: DeviceHarness) -> None:
    assert harness.device.internal_errors == 0
    assert harness.run(command(Cmd.GET_DISPLAY_INFO)).type == Resp.OK_DISPLAY_INFO
    harness.ok(command(Cmd.RESOURCE_CREATE_2D, ResourceCreate2d(1000, 2, 8, 8)))


FLUSH_EVERYTHING = [command(Cmd.RESOURCE_FLUSH, encode(ResourceFlush(0, 0, 64, 32, 1))),
                    command(Cmd.RESOURCE_FLUSH, encode(ResourceFlush(0, 0, 16, 16, 2)))]


def display_drained(harness: DeviceHarness) -> bool:
    channel, peer = harness.device.state.scanouts.display, harness.peer
    assert channel is not None and peer is not None
    readable, _, _ = select.select([peer.sock], [], [], 0)
    return channel.backlog == 0 and not readable


def check_display_stream(messages: list[DisplayMessage]) -> None:
    """QEMU's rules: no UPDATE before a non-empty SCANOUT, UPDATEs inside the surface."""
    announced: dict[int, tuple[int, int]] = {}
    for message in messages:
        if message.request == DisplayReq.SCANOUT:
            scanout = decode(VhostUserGpuScanout, message.payload)
            if scanout.width and scanout.height:
                announced[scanout.scanout_id] = (scanout.width, scanout.height)
            else:
                announced.pop(scanout.scanout_id, None)
        elif message.request == DisplayReq.UPDATE:
            update = decode(VhostUserGpuUpdate, message.payload)
            assert update.scanout_id in announced, "UPDATE before SCANOUT"
            width, height = announced[update.scanout_id]
            assert update.x + update.width <= width and update.y + update.height <= height
            assert update.width and update.height
            assert len(message.payload) == UPDATE_HEADER + 4 * update.width * update.height


@settings(max_examples=200, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands=st.lists(guest_commands(), min_size=1, max_size=6))
def test_arbitrary_commands_get_well_formed_answers(commands: list[bytes]) -> None:
    harness = with_resources(DeviceHarness(display=True))
    try:
        for raw in commands:
            check_response(harness.run(raw), raw)
        for probe in FLUSH_EVERYTHING:  # whatever scanout state the guest left
            check_response(harness.run(probe), probe)
        assert_still_serving(harness)
        run_until(harness.loop, lambda: display_drained(harness))
        assert harness.peer is not None
        check_display_stream(harness.peer.received)
    finally:
        harness.close()


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(commands=st.lists(guest_commands(), min_size=1, max_size=4))
def test_arbitrary_commands_with_every_command_set(commands: list[bytes]) -> None:
    """The same with blob and context commands registered (no host GPU)."""
    harness = with_resources(DeviceHarness(options=DeviceOptions()))
    try:
        for raw in commands:
            check_response(harness.run(raw), raw)
        assert_still_serving(harness)
    finally:
        harness.close()


DESCRIPTORS = st.tuples(
    st.sampled_from([0x10000, 0x90000, 0x4000_0000, 0, (1 << 64) - 8, BACKING_BASE]),
    st.sampled_from([0, 8, 24, 40, 0x1000, 0xFFFF_FFFF]), st.integers(0, 7), st.integers(0, 70))


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(table=st.lists(DESCRIPTORS, min_size=8, max_size=8),
       heads=st.lists(st.integers(0, 70), min_size=1, max_size=6),
       jump=st.booleans())
def test_corrupt_rings_break_the_ring_or_get_answers(
        table: list[tuple[int, int, int, int]], heads: list[int], jump: bool) -> None:
    harness = DeviceHarness()
    try:
        ring = harness.control
        harness.ram.write(0x10000, command(Cmd.GET_DISPLAY_INFO))
        harness.ram.write(ring.desc_gpa, b"".join(pack_desc(*d) for d in table))
        ring.publish(*heads)
        if jump:
            ring.set_avail_idx(ring.avail_idx + 64)
        queue = harness.device.queues[0]
        with deadline(5.0):
            harness.device.process(0)
        used = ring.take_used()
        assert len(used) < len(heads) if queue.broken else len(used) == len(heads)
        for head, written in used:
            assert head in heads and written <= 408
        assert harness.device.internal_errors == 0
        ring.reset(queue)
        assert_still_serving(harness)
    finally:
        harness.close()
