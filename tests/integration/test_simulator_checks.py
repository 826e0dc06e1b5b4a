"""The simulator's own checks fire: a test that relies on them must be able to fail.

These play a misbehaving back-end by hand over socketpairs (no back-end process).
"""

from __future__ import annotations

import itertools
import socket
import struct
import threading
import time
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from protocol.display import DisplayReq
from protocol.vhost_user import FrontendReq
from tests.frontend.display_peer import DisplayPeer, SimulatedConsole, default_modes
from tests.frontend.edid import parse_edid
from tests.frontend.flavour import QEMU_7_2, QEMU_10, QemuFlavour
from tests.frontend.guest_ram import ABOVE_4G, PAGE_SIZE, GuestRam, Segment
from tests.frontend.vhost_frontend import ReplyError, VhostUserFrontend
from tests.frontend.virtqueue_driver import SplitQueueDriver


def display_message(request: int, payload: bytes = b"") -> bytes:
    """A back-end -> QEMU display message."""
    return struct.pack("<III", request, 0, len(payload)) + payload


def update(scanout: int, x: int, y: int, w: int, h: int, pixels: bytes | None = None) -> bytes:
    """An UPDATE message (pixels default to the right amount of 0x11)."""
    data = bytes([0x11]) * (w * h * 4) if pixels is None else pixels
    return display_message(DisplayReq.UPDATE, struct.pack("<5I", scanout, x, y, w, h) + data)


def scanout(scanout_id: int, w: int, h: int) -> bytes:
    """A SCANOUT message."""
    return display_message(DisplayReq.SCANOUT, struct.pack("<3I", scanout_id, w, h))


@pytest.fixture
def peer_factory() -> Iterator[Callable[[QemuFlavour], tuple[DisplayPeer, socket.socket]]]:
    """QEMU's display peer and the back-end's end of the socket."""
    made: list[tuple[DisplayPeer, socket.socket]] = []

    def make(flavour: QemuFlavour) -> tuple[DisplayPeer, socket.socket]:
        qemu_end, backend_end = socket.socketpair()
        peer = DisplayPeer(qemu_end, flavour, SimulatedConsole(1), default_modes(1))
        made.append((peer, backend_end))
        return peer, backend_end

    yield make
    for peer, backend_end in made:
        backend_end.close()
        peer.close()


def settle(peer: DisplayPeer, count: int) -> None:
    """Wait until ``count`` messages were handled."""
    peer.wait_for(lambda: len(peer.events) >= count, 5, f"{count} messages")


@pytest.mark.parametrize(("messages", "violation"), [
    ([update(0, 0, 0, 2, 2)], "before any SCANOUT"),
    ([scanout(0, 8, 8), update(0, 0, 0, 2, 2), scanout(0, 0, 0), update(0, 0, 0, 2, 2)],
     "after SCANOUT(w=0)"),
    ([scanout(0, 8, 8), update(0, 0, 0, 2, 2, bytes(15))], "expected 36"),
    ([scanout(1, 8, 8)], "unknown scanout 1"),
    ([scanout(0, 8, 8), update(3, 0, 0, 1, 1)], "unknown scanout 3"),
], ids=["update-before-scanout", "update-after-disable", "short-update", "bad-scanout",
        "update-bad-scanout"])
def test_console_records_qemu_crash_conditions(peer_factory: Callable[..., tuple[
        DisplayPeer, socket.socket]], messages: list[bytes], violation: str) -> None:
    """Each of QEMU's traps is a violation that makes ``check()`` fail."""
    peer, backend_end = peer_factory(QEMU_10)
    for m in messages:
        backend_end.sendall(m)
    settle(peer, len(messages))
    with pytest.raises(AssertionError, match="violations"):
        peer.check()
    assert any(violation in v for v in peer.console.violations), peer.console.violations


def test_console_composites_like_qemu(peer_factory: Callable[..., tuple[
        DisplayPeer, socket.socket]]) -> None:
    """Scanout-relative placement, BGRX bytes, clipping at the surface edge."""
    peer, backend_end = peer_factory(QEMU_10)
    block = np.arange(3 * 4 * 4, dtype=np.uint8).reshape(3, 4, 4)
    backend_end.sendall(scanout(0, 6, 5) + update(0, 4, 3, 4, 3, block.tobytes()))
    settle(peer, 2)
    peer.check()
    surface = peer.console.surface(0)
    assert np.array_equal(surface[3:5, 4:6], block[:2, :2])
    assert not surface[:3].any() and not surface[:, :4].any()


def test_display_replies_per_flavour(peer_factory: Callable[..., tuple[
        DisplayPeer, socket.socket]]) -> None:
    """Protocol features 0 / 0x3; GET_EDID unanswered by 7.2, a valid EDID from 10.x."""
    for flavour, features in ((QEMU_7_2, 0), (QEMU_10, 3)):
        _, backend_end = peer_factory(flavour)
        backend_end.sendall(display_message(DisplayReq.GET_PROTOCOL_FEATURES))
        assert backend_end.recv(20) == struct.pack("<IIIQ", 1, 4, 8, features)
        backend_end.sendall(display_message(DisplayReq.GET_EDID, struct.pack("<I", 0)))
        backend_end.settimeout(0.3)
        if flavour is QEMU_7_2:
            with pytest.raises(TimeoutError):
                backend_end.recv(1)
            continue
        reply = b""
        while len(reply) < 12 + 1056:
            reply += backend_end.recv(4096)
        assert struct.unpack_from("<III", reply) == (DisplayReq.GET_EDID, 4, 1056)
        size = struct.unpack_from("<I", reply, 12 + 24)[0]
        info = parse_edid(reply[12 + 32:12 + 32 + size])
        assert info.checksum_ok and (info.preferred_width, info.preferred_height) == (1280, 800)


class FakeBackend:
    """Answers the next request on a socketpair with a scripted reply."""

    def __init__(self, reply: Callable[[int], bytes], fds: list[int] | None = None) -> None:
        self.frontend_sock, self.sock = socket.socketpair()
        self.reply, self.fds = reply, fds or []
        self.thread = threading.Thread(target=self._serve, daemon=True)
        self.thread.start()

    def _serve(self) -> None:
        header = self.sock.recv(12)
        request, _, size = struct.unpack("<III", header)
        if size:
            self.sock.recv(size)
        data = self.reply(request)
        if self.fds:
            socket.send_fds(self.sock, [data], self.fds)
        else:
            self.sock.sendall(data)

    def close(self) -> None:
        self.thread.join(2)
        self.sock.close()
        self.frontend_sock.close()


@pytest.mark.parametrize(("reply", "message"), [
    (lambda r: struct.pack("<IIIQ", r, 0x1, 8, 0), "flags 0x1"),
    (lambda r: struct.pack("<IIIQ", r, 0xD, 8, 0), "flags 0xd"),
    (lambda r: struct.pack("<IIIQ", r + 1, 0x5, 8, 0), "unexpected msg type"),
    (lambda r: struct.pack("<IIII", r, 0x5, 4, 0), "bad msg size"),
], ids=["no-reply-bit", "need-reply-bit", "wrong-request", "short"])
def test_frontend_rejects_bad_replies(reply: Callable[[int], bytes], message: str) -> None:
    """Reply checks as strict as QEMU's ``vhost_user_read_header``."""
    fake = FakeBackend(reply)
    frontend = VhostUserFrontend(fake.frontend_sock, QEMU_10, timeout=2)
    with pytest.raises(ReplyError, match=message):
        frontend.get_u64(FrontendReq.GET_FEATURES)
    fake.close()


def test_frontend_rejects_failed_ack_and_fds() -> None:
    """A non-zero REPLY_ACK value and fds on a reply both fail."""
    fake = FakeBackend(lambda r: struct.pack("<IIIQ", r, 0x5, 8, 1))
    frontend = VhostUserFrontend(fake.frontend_sock, QEMU_10, timeout=2)
    frontend.protocol_features = 1 << 3
    with pytest.raises(ReplyError, match="acked failure"):
        frontend.request(FrontendReq.SET_OWNER, need_reply=True)
    fake.close()
    r, w = socket.socketpair()
    fake = FakeBackend(lambda req: struct.pack("<IIIQ", req, 0x5, 8, 0), [r.fileno()])
    frontend = VhostUserFrontend(fake.frontend_sock, QEMU_10, timeout=2)
    with pytest.raises(ReplyError, match="fds"):
        frontend.get_u64(FrontendReq.GET_FEATURES)
    fake.close()
    r.close()
    w.close()


def test_guest_ram_layout_and_allocator() -> None:
    """Split translation, region-crossing writes, scattered pages never adjacent."""
    ram = GuestRam(8 << 20, split_at=4 << 20)
    assert ram.file_offset(ABOVE_4G + 8) == (4 << 20) + 8
    assert ram.qva(ABOVE_4G) == ram.regions[1].userspace_addr
    pages = ram.alloc_scattered(200, regions=[0, 1])
    assert {ram.region_of(p) for p in pages} == {0, 1}
    ordered = sorted(pages)
    assert all(b - a > PAGE_SIZE for a, b in itertools.pairwise(ordered))
    adjacent = GuestRam(8 << 20, split_at=4 << 20, high_gpa=4 << 20)
    adjacent.write((4 << 20) - 3, b"abcdef")
    assert adjacent.read((4 << 20) - 3, 6) == b"abcdef"
    assert adjacent.map[0x400000 - 3:0x400000] == b"abc"
    with pytest.raises(KeyError):
        ram.region_of(ram.unbacked_gpa())
    runs = [(ram.alloc_contiguous(n * PAGE_SIZE), n * PAGE_SIZE) for n in (1, 7, 64, 3)]
    taken = set(pages)
    for gpa, length in runs:
        span = set(range(gpa, gpa + length, PAGE_SIZE))
        assert not span & taken, "contiguous run overlaps pages already handed out"
        assert ram.region_of(gpa) == ram.region_of(gpa + length - 1)
        taken |= span
    free_before = ram.free_pages()
    ram.free(*runs[1])
    assert ram.free_pages() == free_before + 7
    assert ram.alloc_contiguous(7 * PAGE_SIZE) == runs[1][0]
    ram.close()
    adjacent.close()


def test_queue_kicks_follow_avail_event() -> None:
    """With EVENT_IDX the driver kicks only when its new index passes avail_event."""
    ram = GuestRam(1 << 20)
    q = SplitQueueDriver(ram, 0, 16, event_idx=True)
    seg_gpa = ram.alloc_contiguous(64)
    q.avail_event_word[0] = 0
    q.add([Segment(seg_gpa, 8)])
    assert q.publish()  # 0 -> 1 passes avail_event 0
    q.add([Segment(seg_gpa, 8)])
    assert not q.publish()  # 1 -> 2: the device has not asked for more
    q.avail_event_word[0] = 2
    q.add([Segment(seg_gpa, 8)])
    assert q.publish()
    started = time.monotonic()
    assert q.poll_used() == [] and time.monotonic() - started < 1
    ram.close()
