"""Replay the recorded QEMU 7.2 session and require the same traffic.

The simulator plays the trace's vhost-user sequence and its 96 guest commands; the
vhost-user messages (request, flags, size, fd count, both directions), the display
messages (type and size) and the command responses must match the recording, with
only the differences the negotiated features explain (no MQ -> no GET_QUEUE_NUM, ...).
"""

from __future__ import annotations

import re

import numpy as np

from protocol.display import DisplayReq
from protocol.vhost_user import FrontendReq, ProtocolFeature
from tests.frontend.display_peer import DisplayEvent
from tests.frontend.flavour import QEMU_7_2
from tests.frontend.gpu_commands import Fence, GpuResponse, Rect
from tests.frontend.gpu_driver import GuestImage
from tests.frontend.session import Session
from tests.integration.conftest import BackendSpec, SessionFactory
from tests.integration.qemu_trace import Trace, TraceCommand, TraceMessage, load_trace

TRACE = load_trace()
WIDTH, HEIGHT = 1280, 800  # the recorded guest's framebuffer


def expected_vhost_messages(trace: Trace, protocol: int) -> list[tuple[str, int, int, int, int]]:
    """The trace's main-socket messages, adjusted to what ``protocol`` negotiated."""
    conditional = {FrontendReq.GET_QUEUE_NUM: ProtocolFeature.MQ,
                   FrontendReq.GET_MAX_MEM_SLOTS: ProtocolFeature.CONFIGURE_MEM_SLOTS,
                   FrontendReq.SET_BACKEND_REQ_FD: ProtocolFeature.BACKEND_REQ}
    reply_ack = bool(protocol & ProtocolFeature.REPLY_ACK)
    out = []
    for m in trace.channel("Q->B", "B->Q"):
        needed = conditional.get(FrontendReq(m.request)) if m.request in conditional else None
        if needed is not None and not protocol & needed:
            continue
        channel, request, flags, size, fds = m.key
        slots = bool(protocol & ProtocolFeature.CONFIGURE_MEM_SLOTS)
        if request == FrontendReq.ADD_MEM_REG and not slots:
            request, size = FrontendReq.SET_MEM_TABLE, 8 + 32
        if channel == "Q->B" and flags & 0x8 and not reply_ack:
            flags = 0x1
        out.append((channel, request, flags, size, fds))
    if not reply_ack:  # acks only exist with REPLY_ACK
        acked = {FrontendReq.ADD_MEM_REG, FrontendReq.SET_MEM_TABLE,
                 FrontendReq.SET_BACKEND_REQ_FD}
        out = [k for k in out if not (k[0] == "B->Q" and k[1] in acked)]
    return out


def dedup(items: list[tuple[int, ...]]) -> list[tuple[int, ...]]:
    """Drop consecutive repeats."""
    return [x for i, x in enumerate(items) if i == 0 or items[i - 1] != x]


def same_display_effect(actual: list[DisplayEvent], expected: list[TraceMessage]) -> None:
    """What QEMU sees is equivalent to the recording.

    The protocol handshake and the display info request are identical; the scanout
    sizes follow the same sequence (a repeated SCANOUT of an unchanged size may be left
    out); the recorded UPDATEs arrive in order, and any extra UPDATE is a refresh of a
    whole scanout (a back-end may show a newly set scanout at once).
    """
    others = [(e.name, e.size) for e in actual if e.name not in ("SCANOUT", "UPDATE")]
    assert others == [(m.name, m.size) for m in expected
                      if m.name not in ("SCANOUT", "UPDATE")]
    want_sizes = dedup([tuple(int(v) for v in re.findall(r"(\d+)x(\d+)", m.detail)[0])
                        for m in expected if m.name == "SCANOUT"])
    assert dedup([e.fields[1:] for e in actual if e.name == "SCANOUT"]) == want_sizes
    updates = [e for e in actual if e.name == "UPDATE"]
    recorded = [m.size for m in expected if m.name == "UPDATE"]
    refresh = [e.fields[1:3] == (0, 0) and e.size == 20 + WIDTH * HEIGHT * 4 for e in updates]
    # can[j]: the updates seen so far can explain the first j recorded ones
    can = [True] + [False] * len(recorded)
    for i, e in enumerate(updates):
        can = [can[0] and refresh[i]] + [
            (can[j - 1] and e.size == recorded[j - 1]) or (can[j] and refresh[i])
            for j in range(1, len(recorded) + 1)]
    assert can[-1], ([e.size for e in updates], recorded)


def replay_command(session: Session, cmd: TraceCommand, images: dict[int, GuestImage],
                   pixels: dict[int, np.ndarray]) -> GpuResponse:
    """Issue one recorded guest command with equivalent parameters."""
    gpu, p = session.gpu, cmd.params
    x, y = (int(v) for v in p.get("rect", "0,0").split(","))
    rect = Rect(x, y, int(p.get("w", 0)), int(p.get("h", 0)))
    fence = Fence(int(p["fence"])) if "fence" in p else None
    res = int(p.get("res", 0))
    if cmd.name == "GET_DISPLAY_INFO":
        return gpu.get_display_info()
    if cmd.name == "RESOURCE_CREATE_2D":
        images[res] = GuestImage(res, int(p["fmt"]), rect.width, rect.height, [])
        return gpu.create_2d(res, int(p["fmt"]), rect.width, rect.height, fence)
    if cmd.name == "RESOURCE_ATTACH_BACKING":
        image = images[res]
        image.backing = gpu.alloc_backing(image.width * image.height * 4)
        rng = np.random.default_rng(res)
        pixels[res] = rng.integers(0, 256, (image.height, image.width, 4), dtype=np.uint8)
        image.write_pixels(session.ram, pixels[res])
        return gpu.attach_backing(res, image.backing)
    if cmd.name == "SET_SCANOUT":
        return gpu.set_scanout(int(p["scanout"]), res, rect)
    if cmd.name == "TRANSFER_TO_HOST_2D":
        return gpu.transfer(res, rect, int(p["offset"]))
    if cmd.name == "RESOURCE_FLUSH":
        return gpu.flush(res, rect)
    if cmd.name == "RESOURCE_UNREF":
        return gpu.unref(res)
    raise AssertionError(f"trace command {cmd.name} has no replay")


def test_replay_of_recorded_qemu_7_2_session(open_session: SessionFactory,
                                             backend: BackendSpec) -> None:
    """Handshake, 96 commands, 45 display messages and the stop, as recorded."""
    s = open_session(start=False, flavour=QEMU_7_2)
    s.realize()
    s.probe()
    s.driver_ok()
    images: dict[int, GuestImage] = {}
    pixels: dict[int, np.ndarray] = {}
    for cmd in TRACE.commands:
        resp = replay_command(s, cmd, images, pixels)
        if cmd.response is not None:
            assert resp.type_name == cmd.response.removeprefix("RESP_"), cmd
    display_expected = [(m.name, m.size) for m in TRACE.channel("B->Qg")]
    s.sync_display()
    events = [e for e in s.display.events if e.name != "CURSOR_POS_HIDE"]  # the sync marker
    same_display_effect(events, TRACE.channel("B->Qg"))
    if not backend.is_ours:  # the recording was made with this back-end: message for message
        assert [(e.name, e.size) for e in events] == display_expected
    assert s.display.of_type(DisplayReq.SET_PROTOCOL_FEATURES)[0].fields == (0,)
    # the last recorded frame is resource 2, flushed in full
    assert np.array_equal(s.console.surface(0)[..., :3], pixels[2][..., :3])
    bases = s.stop()
    assert bases == [len(TRACE.commands), 1]  # the cursor ring carried the sync marker
    expected = expected_vhost_messages(TRACE, s.neg.protocol)
    actual = [(m.direction, m.request, m.flags, m.size, m.fds) for m in s.frontend.log]
    assert actual == expected


def test_trace_parses_completely() -> None:
    """The parser sees every message the trace's summary line counts."""
    counts: dict[str, int] = {}
    for m in TRACE.messages:
        counts[f"{m.channel} {m.name}"] = counts.get(f"{m.channel} {m.name}", 0) + 1
    assert counts["B->Qg UPDATE"] == 40
    assert counts["Q->B SET_VRING_CALL"] == 8
    assert counts["B->Q GET_VRING_BASE"] == 2
    assert len(TRACE.commands) == 96
    assert sum(1 for c in TRACE.commands if c.response is None) == 19
