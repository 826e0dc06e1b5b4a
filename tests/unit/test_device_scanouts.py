"""Scanouts through ``VirtioGpuDevice.process()``: SET_SCANOUT, RESOURCE_FLUSH and blob
scanouts with QEMU's display peer, and the cursor queue."""

from __future__ import annotations

import dataclasses
import socket
from collections.abc import Iterator

import numpy as np
import pytest

from protocol.display import (
    DisplayMessage,
    DisplayReq,
    VhostUserGpuCursorPos,
    VhostUserGpuCursorUpdate,
    VhostUserGpuScanout,
    VhostUserGpuUpdate,
)
from protocol.virtio_gpu import (
    ResourceCreateBlob,
    ResourceFlush,
    ResourceUnref,
    SetScanout,
    SetScanoutBlob,
    TransferToHost2d,
    UpdateCursor,
)
from protocol.virtio_gpu_codes import BlobMem, Cmd, Format
from protocol.wire import decode, encode, layout
from tests.unit.device_harness import (
    BACKING_BASE,
    TWO_D_ONLY,
    DeviceHarness,
    code,
    command,
    mem_entries,
    peer_of,
)
from tests.unit.display_peer import DisplayPeer
from tests.unit.loop_runner import run_until

# --- SET_SCANOUT, RESOURCE_FLUSH with the display -----------------------------------------


def fill_and_transfer(harness: DeviceHarness, resource_id: int, width: int, height: int,
                      fmt: Format) -> np.ndarray:
    """Create a resource with random pixels, transferred; returns the guest bytes."""
    rng = np.random.default_rng(resource_id)
    guest = rng.integers(0, 256, size=(height, width * 4), dtype=np.uint8)
    harness.ram.write(BACKING_BASE, guest.tobytes())
    harness.create_2d(resource_id, width, height, fmt=fmt)
    harness.ok(command(Cmd.TRANSFER_TO_HOST_2D,
                       TransferToHost2d(0, 0, width, height, 0, resource_id)))
    return guest


def as_bgrx_bytes(rgba_rows: np.ndarray) -> bytes:
    """R8G8B8A8 rows -> B, G, R bytes (+ the 4th byte, which QEMU ignores)."""
    return rgba_rows.reshape(-1, 4)[:, [2, 1, 0, 3]].tobytes()


def test_set_scanout_and_flush_send_scanout_and_updates(shown: DeviceHarness) -> None:
    peer = peer_of(shown)
    guest = fill_and_transfer(shown, 1, 16, 8, Format.R8G8B8A8_UNORM)
    shown.ok(command(Cmd.SET_SCANOUT, SetScanout(4, 2, 10, 5, 0, 1)))
    run_until(shown.loop, lambda: len(peer.of(DisplayReq.UPDATE)) == 1)
    assert decode(VhostUserGpuScanout, peer.of(DisplayReq.SCANOUT)[0].payload) == \
        VhostUserGpuScanout(0, 10, 5)
    first = peer.of(DisplayReq.UPDATE)[0]
    header = layout(VhostUserGpuUpdate).size
    assert decode(VhostUserGpuUpdate, first.payload) == VhostUserGpuUpdate(0, 0, 0, 10, 5)
    got = np.frombuffer(first.payload[header:], np.uint8).reshape(5, 10, 4)[..., :3]
    want = np.frombuffer(as_bgrx_bytes(guest[2:7, 16:56]), np.uint8).reshape(5, 10, 4)[..., :3]
    assert np.array_equal(got, want)
    # a flush of a rectangle partly outside the scanout: only the overlap, in scanout
    # coordinates
    shown.ok(command(Cmd.RESOURCE_FLUSH, ResourceFlush(0, 0, 6, 4, 1)))
    run_until(shown.loop, lambda: len(peer.of(DisplayReq.UPDATE)) == 2)
    second = peer.of(DisplayReq.UPDATE)[1]
    assert decode(VhostUserGpuUpdate, second.payload) == VhostUserGpuUpdate(0, 0, 0, 2, 2)
    got = np.frombuffer(second.payload[header:], np.uint8).reshape(2, 2, 4)[..., :3]
    want = np.frombuffer(as_bgrx_bytes(guest[2:4, 16:24]), np.uint8).reshape(2, 2, 4)[..., :3]
    assert np.array_equal(got, want)
    assert len(peer.of(DisplayReq.SCANOUT)) == 1  # the size did not change


def test_unref_of_a_shown_resource_disables_the_scanout(shown: DeviceHarness) -> None:
    peer = peer_of(shown)
    fill_and_transfer(shown, 1, 4, 4, Format.B8G8R8X8_UNORM)
    shown.ok(command(Cmd.SET_SCANOUT, SetScanout(0, 0, 4, 4, 0, 1)))
    shown.ok(command(Cmd.RESOURCE_UNREF, ResourceUnref(1)))
    run_until(shown.loop, lambda: len(peer.of(DisplayReq.SCANOUT)) == 2)
    assert decode(VhostUserGpuScanout, peer.of(DisplayReq.SCANOUT)[1].payload) == \
        VhostUserGpuScanout(0, 0, 0)


def update_bgr(message: DisplayMessage) -> np.ndarray:
    """The (h, w, 3) B, G, R bytes of an UPDATE."""
    update = decode(VhostUserGpuUpdate, message.payload)
    header = layout(VhostUserGpuUpdate).size
    pixels = np.frombuffer(message.payload[header:], np.uint8)
    return pixels.reshape(update.height, update.width, 4)[..., :3]


def test_a_new_display_socket_gets_each_scanouts_rectangle(shown: DeviceHarness) -> None:
    """The scanout shows (16, 16, 32, 32) of a resource: the new socket is told 32x32 and
    gets the picture at (0, 0) of the surface, read from (16, 16) of the resource."""
    guest = fill_and_transfer(shown, 1, 64, 64, Format.R8G8B8A8_UNORM)
    shown.ok(command(Cmd.SET_SCANOUT, SetScanout(16, 16, 32, 32, 0, 1)))
    ours, theirs = socket.socketpair()
    peer = DisplayPeer(shown.loop, theirs)
    try:
        shown.device.attach_display(ours.detach())
        run_until(shown.loop, lambda: bool(peer.of(DisplayReq.UPDATE)))
        assert [decode(VhostUserGpuScanout, m.payload) for m in peer.of(DisplayReq.SCANOUT)] \
            == [VhostUserGpuScanout(0, 32, 32)]
        update = peer.of(DisplayReq.UPDATE)[0]
        assert decode(VhostUserGpuUpdate, update.payload) == VhostUserGpuUpdate(0, 0, 0, 32, 32)
        want = np.frombuffer(as_bgrx_bytes(guest[16:48, 64:192]), np.uint8)
        assert np.array_equal(update_bgr(update), want.reshape(32, 32, 4)[..., :3])
    finally:
        peer.close()


# --- blobs on scanouts ---------------------------------------------------------------

BLOB_STRIDE = 8 * 4  # 8x8 framebuffers, rows not padded


@pytest.fixture
def blobs() -> Iterator[DeviceHarness]:
    """Blobs (GUEST only: no host GPU) and a display peer."""
    harness = DeviceHarness(options=dataclasses.replace(TWO_D_ONLY, blob=True), display=True)
    yield harness
    assert harness.device.internal_errors == 0
    harness.close()


def create_blob(harness: DeviceHarness, resource_id: int, size: int, gpa: int) -> None:
    """A GUEST blob of ``size`` bytes over guest RAM at ``gpa``."""
    harness.ok(command(Cmd.RESOURCE_CREATE_BLOB,
                       encode(ResourceCreateBlob(resource_id, BlobMem.GUEST, 0, 1, 0, size))
                       + mem_entries((gpa, size))))


def scanout_blob(resource_id: int, offset: int = 0, *, scanout: int = 0,
                 fb: tuple[int, int] = (8, 8), shown: tuple[int, int] | None = None) -> bytes:
    """SET_SCANOUT_BLOB of a ``fb`` (width, height) B8G8R8X8 framebuffer at ``offset``,
    rows not padded, on ``scanout``: its top-left ``shown`` pixels (default: whole)."""
    (width, height), (shown_w, shown_h) = fb, shown or fb
    return command(Cmd.SET_SCANOUT_BLOB, SetScanoutBlob(
        0, 0, shown_w, shown_h, scanout, resource_id, width, height, Format.B8G8R8X8_UNORM,
        0, width * 4, 0, 0, 0, offset, 0, 0, 0))


def test_flush_of_a_blob_never_shown_is_refused(blobs: DeviceHarness) -> None:
    """A blob has no size until SET_SCANOUT_BLOB gives it one."""
    create_blob(blobs, 1, 4096, BACKING_BASE)
    assert code(blobs, command(Cmd.RESOURCE_FLUSH, ResourceFlush(0, 0, 1, 1, 1))) == \
        "ERR_INVALID_PARAMETER"


def test_set_scanout_blob_again_with_a_new_offset_flushes_from_it(blobs: DeviceHarness
                                                                   ) -> None:
    """A page flip: same blob, same rectangle, the framebuffer at another offset; the
    next flush shows the pixels there."""
    peer = peer_of(blobs)
    frames = np.random.default_rng(7).integers(0, 256, (2, 8, 8, 4), dtype=np.uint8)
    blobs.ram.write(BACKING_BASE, frames.tobytes())
    create_blob(blobs, 1, frames.nbytes, BACKING_BASE)
    blobs.ok(scanout_blob(1, offset=0))
    blobs.ok(scanout_blob(1, offset=frames[0].nbytes))
    blobs.ok(command(Cmd.RESOURCE_FLUSH, ResourceFlush(0, 0, 8, 8, 1)))
    run_until(blobs.loop, lambda: len(peer.of(DisplayReq.UPDATE)) == 2)
    shown = [update_bgr(m) for m in peer.of(DisplayReq.UPDATE)]
    assert np.array_equal(shown[0], frames[0][..., :3])
    assert np.array_equal(shown[1], frames[1][..., :3])


def test_a_blob_on_two_scanouts_flushes_within_either_framebuffer() -> None:
    """One blob laid out as 16x4 on scanout 0 and as 8x8 on scanout 1: a flush must fit
    one of the framebuffers (not just the last one set), and each scanout gets the
    part of the rectangle it shows, read with its own layout."""
    harness = DeviceHarness(options=dataclasses.replace(
        TWO_D_ONLY, blob=True, max_outputs=2), display=True)
    try:
        peer = peer_of(harness)
        pixels = np.random.default_rng(3).integers(0, 256, (64, 4), dtype=np.uint8)
        harness.ram.write(BACKING_BASE, pixels.tobytes())
        create_blob(harness, 1, pixels.nbytes, BACKING_BASE)
        for scanout, fb in enumerate([(16, 4), (8, 8)]):
            harness.ok(scanout_blob(1, scanout=scanout, fb=fb))
        run_until(harness.loop, lambda: len(peer.of(DisplayReq.UPDATE)) == 2)
        seen = len(peer.of(DisplayReq.UPDATE))
        # fits the 16x4 framebuffer of scanout 0 only (8x8 was set last)
        harness.ok(command(Cmd.RESOURCE_FLUSH, ResourceFlush(4, 1, 12, 2, 1)))
        run_until(harness.loop, lambda: len(peer.of(DisplayReq.UPDATE)) == seen + 2)
        updates = peer.of(DisplayReq.UPDATE)[seen:]
        assert [decode(VhostUserGpuUpdate, m.payload) for m in updates] == [
            VhostUserGpuUpdate(0, 4, 1, 12, 2), VhostUserGpuUpdate(1, 4, 1, 4, 2)]
        assert np.array_equal(update_bgr(updates[0]),
                              pixels.reshape(4, 16, 4)[1:3, 4:16, :3])
        assert np.array_equal(update_bgr(updates[1]),
                              pixels.reshape(8, 8, 4)[1:3, 4:8, :3])
        # fits the 8x8 framebuffer only: scanout 0 gets its rows 0..3
        harness.ok(command(Cmd.RESOURCE_FLUSH, ResourceFlush(0, 2, 2, 6, 1)))
        run_until(harness.loop, lambda: len(peer.of(DisplayReq.UPDATE)) == seen + 4)
        assert [decode(VhostUserGpuUpdate, m.payload)
                for m in peer.of(DisplayReq.UPDATE)[seen + 2:]] == [
            VhostUserGpuUpdate(0, 0, 2, 2, 2), VhostUserGpuUpdate(1, 0, 2, 2, 6)]
        # fits neither (16 wide, 8 high)
        assert code(harness, command(Cmd.RESOURCE_FLUSH, ResourceFlush(0, 0, 16, 8, 1))) \
            == "ERR_INVALID_PARAMETER"
        # scanout 1 shows nothing any more: the 16x4 framebuffer alone counts
        harness.ok(command(Cmd.SET_SCANOUT_BLOB, SetScanoutBlob(
            0, 0, 0, 0, 1, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0, 0)))
        assert code(harness, command(Cmd.RESOURCE_FLUSH, ResourceFlush(0, 2, 2, 6, 1))) \
            == "ERR_INVALID_PARAMETER"
        harness.ok(command(Cmd.RESOURCE_FLUSH, ResourceFlush(0, 0, 16, 4, 1)))
        assert harness.device.internal_errors == 0
    finally:
        harness.close()


def test_a_blob_re_laid_out_on_the_same_rectangle_flushes_within_the_new_layout(
        blobs: DeviceHarness) -> None:
    """SET_SCANOUT_BLOB again with the same rectangle but another framebuffer size (the
    scanout is not re-announced): flushes are checked against the new size."""
    create_blob(blobs, 1, 64 * 4, BACKING_BASE)
    for fb in [(16, 4), (8, 8)]:
        blobs.ok(scanout_blob(1, fb=fb, shown=(4, 4)))
    blobs.ok(command(Cmd.RESOURCE_FLUSH, ResourceFlush(0, 6, 2, 2, 1)))  # 8x8 only
    assert code(blobs, command(Cmd.RESOURCE_FLUSH, ResourceFlush(10, 0, 2, 2, 1))) == \
        "ERR_INVALID_PARAMETER"  # 16x4 only


@pytest.mark.parametrize("first", ["2d", "blob"])
def test_a_resource_replaced_by_a_blob_no_longer_reaches_the_scanout(
        blobs: DeviceHarness, first: str) -> None:
    """Scanout 0 shows A, then blob B: a flush of A sends nothing, and UNREF(A) does not
    disable the scanout, which goes on showing B."""
    peer = peer_of(blobs)
    if first == "2d":
        fill_and_transfer(blobs, 1, 8, 8, Format.B8G8R8X8_UNORM)
        blobs.ok(command(Cmd.SET_SCANOUT, SetScanout(0, 0, 8, 8, 0, 1)))
    else:
        create_blob(blobs, 1, 8 * BLOB_STRIDE, BACKING_BASE)
        blobs.ok(scanout_blob(1))
    create_blob(blobs, 2, 8 * BLOB_STRIDE, BACKING_BASE + 0x10000)
    blobs.ok(scanout_blob(2))
    run_until(blobs.loop, lambda: len(peer.of(DisplayReq.UPDATE)) == 2)
    seen = len(peer.received)
    blobs.ok(command(Cmd.RESOURCE_FLUSH, ResourceFlush(0, 0, 8, 8, 1)))
    blobs.ok(command(Cmd.RESOURCE_UNREF, ResourceUnref(1)))
    blobs.ok(command(Cmd.RESOURCE_FLUSH, ResourceFlush(0, 0, 8, 8, 2)))
    run_until(blobs.loop, lambda: len(peer.of(DisplayReq.UPDATE)) >= 3)
    assert [DisplayReq(m.request) for m in peer.received[seen:]] == [DisplayReq.UPDATE]


def test_a_bug_while_drawing_a_scanout_is_counted_not_raised(caplog: pytest.LogCaptureFixture
                                                             ) -> None:
    """Drawing also runs from the display socket's drain callback on the event loop: an
    exception of ours there is logged and counted, never raised out of the loop."""
    harness = DeviceHarness(display=True)
    try:
        fill_and_transfer(harness, 1, 4, 4, Format.B8G8R8X8_UNORM)
        harness.ok(command(Cmd.SET_SCANOUT, SetScanout(0, 0, 4, 4, 0, 1)))

        def broken(rect: tuple[int, int, int, int]) -> np.ndarray:
            raise MemoryError("drawing")
        harness.device.state.scanouts.scanouts[0].source = broken
        harness.ok(command(Cmd.RESOURCE_FLUSH, ResourceFlush(0, 0, 4, 4, 1)))
        assert harness.device.internal_errors == 1
        assert "internal error reading scanout 0's pixels" in caplog.text
        harness.create_2d(2, 4, 4)  # still serving
    finally:
        harness.close()


def test_set_scanout_errors(dev: DeviceHarness) -> None:
    dev.create_2d(1, 8, 8)
    cases = [
        (SetScanout(0, 0, 8, 8, 1, 1), "ERR_INVALID_SCANOUT_ID"),  # max_outputs is 1
        (SetScanout(0, 0, 8, 8, 0xFFFF_FFFF, 1), "ERR_INVALID_SCANOUT_ID"),
        (SetScanout(0, 0, 8, 8, 0, 2), "ERR_INVALID_RESOURCE_ID"),
        (SetScanout(0, 0, 0, 8, 0, 1), "ERR_INVALID_PARAMETER"),
        (SetScanout(1, 0, 8, 8, 0, 1), "ERR_INVALID_PARAMETER"),
        (SetScanout(0xFFFF_FFFF, 0, 2, 8, 0, 1), "ERR_INVALID_PARAMETER"),
        (SetScanout(0, 0, 0, 0, 0, 0), "OK_NODATA"),  # resource 0 disables
        (SetScanout(0, 0, 8, 8, 0, 1), "OK_NODATA"),
    ]
    for body, expected in cases:
        assert code(dev, command(Cmd.SET_SCANOUT, body)) == expected, body


def test_flush_errors(dev: DeviceHarness) -> None:
    dev.create_2d(1, 8, 8)
    assert code(dev, command(Cmd.RESOURCE_FLUSH, ResourceFlush(0, 0, 8, 8, 2))) == \
        "ERR_INVALID_RESOURCE_ID"
    assert code(dev, command(Cmd.RESOURCE_FLUSH, ResourceFlush(4, 4, 5, 1, 1))) == \
        "ERR_INVALID_PARAMETER"
    dev.ok(command(Cmd.RESOURCE_FLUSH, ResourceFlush(0, 0, 8, 8, 1)))  # not shown: fine


# --- the cursor queue ------------------------------------------------------------------


def test_cursor_commands(shown: DeviceHarness) -> None:
    peer = peer_of(shown)
    guest = fill_and_transfer(shown, 5, 64, 64, Format.B8G8R8X8_UNORM)
    shown.cursor_command(command(Cmd.UPDATE_CURSOR, UpdateCursor(0, 10, 20, 0, 5, 3, 4)))
    shown.cursor_command(command(Cmd.MOVE_CURSOR, UpdateCursor(0, 30, 40, 0, 5, 0, 0)))
    shown.cursor_command(command(Cmd.MOVE_CURSOR, UpdateCursor(0, 50, 60, 0, 0, 0, 0)))
    run_until(shown.loop, lambda: bool(peer.of(DisplayReq.CURSOR_POS_HIDE)))
    update = peer.of(DisplayReq.CURSOR_UPDATE)[0]
    assert decode(VhostUserGpuCursorUpdate, update.payload) == VhostUserGpuCursorUpdate(
        0, 10, 20, 3, 4)
    pixels = np.frombuffer(update.payload[20:], np.uint8).reshape(64, 64, 4)
    assert np.array_equal(pixels[..., :3], guest.reshape(64, 64, 4)[..., :3])
    assert (pixels[..., 3] == 0xFF).all()  # an X format becomes opaque
    assert decode(VhostUserGpuCursorPos, peer.of(DisplayReq.CURSOR_POS)[0].payload) == \
        VhostUserGpuCursorPos(0, 30, 40)
    assert decode(VhostUserGpuCursorPos, peer.of(DisplayReq.CURSOR_POS_HIDE)[0].payload) == \
        VhostUserGpuCursorPos(0, 50, 60)
    assert [written for _, written in shown.cursor.take_used()] == [0, 0, 0]


def test_bad_cursor_commands_are_dropped(shown: DeviceHarness) -> None:
    peer = peer_of(shown)
    shown.create_2d(1, 32, 32, backing_gpa=None)
    for cmd in (command(Cmd.UPDATE_CURSOR, UpdateCursor(0, 0, 0, 0, 1, 0, 0)),  # not 64x64
                command(Cmd.UPDATE_CURSOR, UpdateCursor(0, 0, 0, 0, 9, 0, 0)),  # unknown
                command(Cmd.MOVE_CURSOR, UpdateCursor(3, 0, 0, 0, 1, 0, 0)),  # bad scanout
                command(Cmd.MOVE_CURSOR, UpdateCursor(1, 0, 0, 0, 1, 0, 0)),  # == count
                command(Cmd.GET_DISPLAY_INFO, bytes(32)),  # not a cursor command
                command(Cmd.MOVE_CURSOR, bytes(8))):  # short
        shown.cursor_command(cmd)
    assert len(shown.cursor.take_used()) == 6
    shown.cursor_command(command(Cmd.MOVE_CURSOR, UpdateCursor(0, 1, 2, 0, 1, 0, 0)))
    run_until(shown.loop, lambda: bool(peer.of(DisplayReq.CURSOR_POS)))
    assert peer.of(DisplayReq.CURSOR_UPDATE) == []
    assert [decode(VhostUserGpuCursorPos, m.payload) for m in peer.of(DisplayReq.CURSOR_POS)] \
        == [VhostUserGpuCursorPos(0, 1, 2)]


@pytest.mark.parametrize("cmd", [Cmd.UPDATE_CURSOR, Cmd.MOVE_CURSOR], ids=lambda c: c.name)
def test_cursor_resource_0_hides_the_cursor_at_its_position(shown: DeviceHarness,
                                                            cmd: Cmd) -> None:
    peer = peer_of(shown)
    shown.cursor_command(command(cmd, UpdateCursor(0, 7, 9, 0, 0, 0, 0)))
    run_until(shown.loop, lambda: bool(peer.of(DisplayReq.CURSOR_POS_HIDE)))
    assert decode(VhostUserGpuCursorPos, peer.of(DisplayReq.CURSOR_POS_HIDE)[0].payload) == \
        VhostUserGpuCursorPos(0, 7, 9)
    assert peer.of(DisplayReq.CURSOR_POS) == peer.of(DisplayReq.CURSOR_UPDATE) == []
