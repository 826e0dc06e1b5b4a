"""The display socket: protocol handshake, display info, EDID, socket replacement."""

from __future__ import annotations

import numpy as np
import pytest

from protocol.display import DisplayReq, encode_display_info
from protocol.virtio_gpu import DisplayOne
from protocol.virtio_gpu_codes import Resp
from tests.frontend.edid import parse_edid
from tests.frontend.flavour import QEMU_7_2, QemuFlavour
from tests.frontend.gpu_commands import EDID_RESP_SIZE, Rect
from tests.frontend.gpu_driver import GuestImage
from tests.frontend.session import Session
from tests.integration.conftest import FLAVOUR_NAMES, BackendSpec, SessionFactory

TWO_HEADS = [DisplayOne(0, 0, 1024, 768, 1, 0), DisplayOne(1024, 0, 800, 600, 1, 0)]


def painted_image(s: Session, width: int = 96, height: int = 64, seed: int = 7
                  ) -> tuple[GuestImage, np.ndarray]:
    """A scattered-backing B8G8R8X8 image with random pixels, shown on scanout 0."""
    image = s.gpu.create_image(width, height)
    pixels = np.random.default_rng(seed).integers(0, 256, (height, width, 4), dtype=np.uint8)
    image.write_pixels(s.ram, pixels)
    s.gpu.show(image)
    s.sync_display()
    return image, pixels


@pytest.mark.parametrize("flavour", FLAVOUR_NAMES, indirect=True)
def test_protocol_features_then_display_info(session: Session, flavour: QemuFlavour) -> None:
    """GET_PROTOCOL_FEATURES, then SET_PROTOCOL_FEATURES (a subset of QEMU's offer)."""
    session.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)
    names = session.display.names()
    assert names[:3] == ["GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_DISPLAY_INFO"]
    (chosen,) = session.display.of_type(DisplayReq.SET_PROTOCOL_FEATURES)[0].fields
    assert chosen & ~flavour.display_features == 0
    if flavour is QEMU_7_2:
        assert chosen == 0


def test_display_info_is_qemus_answer(open_session: SessionFactory) -> None:
    """GET_DISPLAY_INFO returns QEMU's 408-byte reply (two heads, offsets)."""
    s = open_session(num_scanouts=2, modes=TWO_HEADS)
    resp = s.gpu.get_display_info()
    assert resp.used_len == 408
    assert resp.raw[24:] == encode_display_info(TWO_HEADS)[24:]
    assert resp.display_modes()[:2] == TWO_HEADS


@pytest.mark.parametrize("flavour", FLAVOUR_NAMES, indirect=True)
def test_edid_built_by_the_backend(open_session: SessionFactory, backend: BackendSpec,
                                   flavour: QemuFlavour) -> None:
    """GET_EDID answers at once, even when QEMU (7.2) never answers the display socket."""
    if flavour is QEMU_7_2:
        backend.require_ours("it forwards GET_EDID to QEMU, which 7.2 never answers")
    s = open_session(num_scanouts=2, modes=TWO_HEADS)
    s.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)
    for scanout, mode in enumerate(TWO_HEADS):
        resp = s.gpu.get_edid(scanout)
        assert resp.used_len == EDID_RESP_SIZE
        blob = resp.edid()
        assert 128 <= len(blob) <= 1024 and len(blob) % 128 == 0
        info = parse_edid(blob)
        assert info.header_ok and info.checksum_ok
        assert (info.preferred_width, info.preferred_height) == (mode.width, mode.height)
        assert info.pixel_clock_khz > 0


def test_second_set_socket_replaces_the_first(session: Session, backend: BackendSpec) -> None:
    """A new GPU_SET_SOCKET while running: SCANOUT + full UPDATE on the new socket."""
    backend.require_ours("it rejects a second GPU_SET_SOCKET (assertion sock_fd == -1)")
    image, pixels = painted_image(session)
    old = session.display
    new = session.new_display_socket()
    new.wait_count(DisplayReq.UPDATE, 1)
    session.sync_display()
    names = [n for n in new.names() if not n.startswith("CURSOR")]  # sync markers
    assert names[:2] == ["GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES"]
    assert names.index("SCANOUT") < names.index("UPDATE")
    assert new.of_type(DisplayReq.SCANOUT)[0].fields == (0, image.width, image.height)
    assert new.of_type(DisplayReq.UPDATE)[0].fields == (0, 0, 0, image.width, image.height)
    assert np.array_equal(session.console.surface(0)[..., :3], pixels[..., :3])
    old.wait_for(lambda: old.closed_by_backend, 15, "the back-end to drop the old socket")
    updates_before = old.count(DisplayReq.UPDATE), new.count(DisplayReq.UPDATE)
    session.gpu.flush(image.resource_id, Rect(0, 0, 8, 8)).expect(Resp.OK_NODATA)
    session.sync_display()
    assert (old.count(DisplayReq.UPDATE), new.count(DisplayReq.UPDATE)) == (
        updates_before[0], updates_before[1] + 1)


def test_vm_stop_cont(session: Session, backend: BackendSpec) -> None:
    """Stop saves the ring bases; cont resumes them on a new display socket."""
    image, pixels = painted_image(session)
    session.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)
    published = session.queues[0].avail_idx
    assert session.stop() == [published, session.queues[1].avail_idx]
    session.cont()
    session.gpu.create_2d(session.gpu.new_resource_id(), 2, 32, 32).expect(Resp.OK_NODATA)
    assert session.queues[0].used_idx() == published + 1
    backend.require_ours("it loses the display after stop/cont (second GPU_SET_SOCKET "
                         "rejected, protocol doc §8.4)")
    new = session.display
    new.wait_count(DisplayReq.UPDATE, 1)
    session.sync_display()
    names = [n for n in new.names() if not n.startswith("CURSOR")]
    assert names[:2] == ["GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES"]
    assert names.index("SCANOUT") < names.index("UPDATE")
    assert np.array_equal(session.console.surface(0)[..., :3], pixels[..., :3])
    session.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)
    updates = new.count(DisplayReq.UPDATE)
    session.gpu.flush(image.resource_id, Rect(0, 0, 4, 4)).expect(Resp.OK_NODATA)
    session.sync_display()
    assert new.of_type(DisplayReq.UPDATE)[updates:][0].fields == (0, 0, 0, 4, 4)


def test_scanout_disable_and_enable(session: Session) -> None:
    """SET_SCANOUT(resource 0) sends SCANOUT w=0 and silences flushes until re-enabled."""
    image, _ = painted_image(session)
    full = Rect(0, 0, image.width, image.height)
    session.gpu.set_scanout(0, 0, Rect(0, 0, 0, 0)).expect(Resp.OK_NODATA)
    session.sync_display()
    assert session.display.of_type(DisplayReq.SCANOUT)[-1].fields == (0, 0, 0)
    updates = session.display.count(DisplayReq.UPDATE)
    session.gpu.flush(image.resource_id, full).expect(Resp.OK_NODATA)
    session.sync_display()
    assert session.display.count(DisplayReq.UPDATE) == updates
    session.gpu.set_scanout(0, image.resource_id, full).expect(Resp.OK_NODATA)
    session.gpu.flush(image.resource_id, full).expect(Resp.OK_NODATA)
    session.sync_display()
    assert session.display.count(DisplayReq.UPDATE) > updates
    assert session.display.of_type(DisplayReq.SCANOUT)[-1].fields == (
        0, image.width, image.height)
