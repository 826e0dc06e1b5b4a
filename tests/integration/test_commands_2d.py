"""Every 2D command on its successful path, with pixels checked on the console."""

from __future__ import annotations

import numpy as np

from protocol.display import DisplayReq
from protocol.virtio_gpu import DisplayOne
from protocol.virtio_gpu_codes import Format, Resp
from tests.frontend.gpu_commands import Rect
from tests.frontend.pixels import apply_transfer, display_bgr, random_pixels
from tests.frontend.session import Session
from tests.integration.conftest import BackendSpec, SessionFactory


def test_create_attach_transfer_scanout_flush(session: Session) -> None:
    """The fbdev sequence: pixels reach the console unchanged (B8G8R8X8)."""
    gpu = session.gpu
    image = gpu.create_image(160, 100)
    pixels = random_pixels(100, 160, 1)
    image.write_pixels(session.ram, pixels)
    gpu.show(image)
    session.sync_display()
    assert session.display.of_type(DisplayReq.SCANOUT)[0].fields == (0, 160, 100)
    assert session.display.of_type(DisplayReq.UPDATE)[0].fields == (0, 0, 0, 160, 100)
    assert np.array_equal(session.console.surface(0)[..., :3], pixels[..., :3])


def test_partial_transfer_with_offset(session: Session) -> None:
    """A sub-rectangle transfer reads ``offset + stride*row``; a full flush shows it."""
    gpu, ram = session.gpu, session.ram
    width, height = 128, 64
    image = gpu.create_image(width, height)
    first, second = random_pixels(height, width, 2), random_pixels(height, width, 3)
    image.write_pixels(ram, first)
    full = Rect(0, 0, width, height)
    gpu.transfer(image.resource_id, full).expect(Resp.OK_NODATA)
    image.write_pixels(ram, second)
    part = Rect(24, 8, 40, 20)
    offset = part.y * image.stride + part.x * 4
    gpu.transfer(image.resource_id, part, offset).expect(Resp.OK_NODATA)
    gpu.set_scanout(0, image.resource_id, full).expect(Resp.OK_NODATA)
    gpu.flush(image.resource_id, full).expect(Resp.OK_NODATA)
    session.sync_display()
    expected = first.copy()
    apply_transfer(expected, second.reshape(-1), part, offset)
    assert np.array_equal(session.console.surface(0)[..., :3], expected[..., :3])


def test_partial_flush_sends_only_the_damage(session: Session) -> None:
    """A flush of a rectangle sends an UPDATE of exactly that rectangle."""
    gpu = session.gpu
    image = gpu.create_image(64, 48)
    pixels = random_pixels(48, 64, 4)
    image.write_pixels(session.ram, pixels)
    gpu.show(image)
    session.sync_display()
    before = session.display.count(DisplayReq.UPDATE)
    pixels2 = random_pixels(48, 64, 5)
    image.write_pixels(session.ram, pixels2)
    gpu.transfer(image.resource_id, Rect(0, 0, 64, 48)).expect(Resp.OK_NODATA)
    gpu.flush(image.resource_id, Rect(8, 4, 16, 10)).expect(Resp.OK_NODATA)
    session.sync_display()
    assert [e.fields for e in session.display.of_type(DisplayReq.UPDATE)[before:]] == [
        (0, 8, 4, 16, 10)]
    expected = pixels.copy()
    expected[4:14, 8:24] = pixels2[4:14, 8:24]
    assert np.array_equal(session.console.surface(0)[..., :3], expected[..., :3])


def test_detach_and_reattach_backing(session: Session) -> None:
    """DETACH_BACKING, then a new backing serves the next transfer."""
    gpu = session.gpu
    image = gpu.create_image(32, 32)
    gpu.detach_backing(image.resource_id).expect(Resp.OK_NODATA)
    gpu.free_backing(image)
    image.backing = gpu.alloc_backing(32 * 32 * 4, scattered=False)
    gpu.attach_backing(image.resource_id, image.backing).expect(Resp.OK_NODATA)
    pixels = random_pixels(32, 32, 6)
    image.write_pixels(session.ram, pixels)
    gpu.show(image)
    session.sync_display()
    assert np.array_equal(session.console.surface(0)[..., :3], pixels[..., :3])


def test_unref_of_displayed_resource_disables_scanout(session: Session) -> None:
    """RESOURCE_UNREF of the scanned-out resource sends SCANOUT(w=0); no UPDATE after."""
    gpu = session.gpu
    image = gpu.create_image(40, 30)
    gpu.show(image)
    gpu.unref(image.resource_id).expect(Resp.OK_NODATA)
    session.sync_display()
    assert [e.fields for e in session.display.of_type(DisplayReq.SCANOUT)] == [
        (0, 40, 30), (0, 0, 0)]
    gpu.create_2d(image.resource_id, Format.B8G8R8X8_UNORM, 8, 8).expect(Resp.OK_NODATA)


def test_unref_releases_the_id(session: Session) -> None:
    """An id can be created again after RESOURCE_UNREF."""
    gpu = session.gpu
    for _ in range(3):
        gpu.create_2d(77, Format.B8G8R8A8_UNORM, 16, 16).expect(Resp.OK_NODATA)
        gpu.unref(77).expect(Resp.OK_NODATA)


def test_two_scanouts_show_parts_of_one_resource(open_session: SessionFactory,
                                                 backend: BackendSpec) -> None:
    """Each scanout gets the damage ∩ its rectangle, in scanout coordinates."""
    backend.require_ours("it sends resource coordinates and empty UPDATEs (protocol doc §5.3)")
    modes = [DisplayOne(0, 0, 64, 64, 1, 0), DisplayOne(64, 0, 64, 64, 1, 0)]
    s = open_session(num_scanouts=2, modes=modes)
    gpu = s.gpu
    image = gpu.create_image(128, 64)
    pixels = random_pixels(64, 128, 8)
    image.write_pixels(s.ram, pixels)
    gpu.transfer(image.resource_id, Rect(0, 0, 128, 64)).expect(Resp.OK_NODATA)
    gpu.set_scanout(0, image.resource_id, Rect(0, 0, 64, 64)).expect(Resp.OK_NODATA)
    gpu.set_scanout(1, image.resource_id, Rect(64, 0, 64, 64)).expect(Resp.OK_NODATA)
    s.sync_display()
    before = s.display.count(DisplayReq.UPDATE)
    gpu.flush(image.resource_id, Rect(32, 16, 64, 16)).expect(Resp.OK_NODATA)
    s.sync_display()
    updates = sorted(e.fields for e in s.display.of_type(DisplayReq.UPDATE)[before:])
    assert updates == [(0, 32, 16, 32, 16), (1, 0, 16, 32, 16)]
    assert np.array_equal(s.console.surface(0)[16:32, 32:64, :3], pixels[16:32, 32:64, :3])
    assert np.array_equal(s.console.surface(1)[16:32, 0:32, :3], pixels[16:32, 64:96, :3])
    gpu.flush(image.resource_id, Rect(0, 0, 16, 16)).expect(Resp.OK_NODATA)
    s.sync_display()
    assert [e.fields for e in s.display.of_type(DisplayReq.UPDATE)][before + 2:] == [
        (0, 0, 0, 16, 16)]


def test_every_format_reaches_the_display_converted(open_session: SessionFactory,
                                                    backend: BackendSpec) -> None:
    """All eight 2D formats arrive as x8r8g8b8 (B, G, R bytes) on the console."""
    backend.require_ours("it sends its own pixel layout without conversion (doc §3.3)")
    s = open_session()
    for i, fmt in enumerate(Format):
        image = s.gpu.create_image(48, 24, fmt)
        pixels = random_pixels(24, 48, 100 + i)
        image.write_pixels(s.ram, pixels)
        s.gpu.show(image)
        s.sync_display()
        shown = s.console.surface(0)[..., :3]
        assert np.array_equal(shown, display_bgr(pixels, fmt)), Format(fmt).name
        s.gpu.unref(image.resource_id).expect(Resp.OK_NODATA)


def test_bgra_and_bgrx_need_no_conversion(session: Session) -> None:
    """Formats 1 and 2 are already the display's byte order (both back-ends)."""
    for i, fmt in enumerate((Format.B8G8R8A8_UNORM, Format.B8G8R8X8_UNORM)):
        image = session.gpu.create_image(20, 10, fmt)
        pixels = random_pixels(10, 20, 200 + i)
        image.write_pixels(session.ram, pixels)
        session.gpu.show(image)
        session.sync_display()
        assert np.array_equal(session.console.surface(0)[..., :3], display_bgr(pixels, fmt))
