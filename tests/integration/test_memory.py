"""Guest RAM in several vhost-user regions: crossing, removal and re-adding."""

from __future__ import annotations

import numpy as np

from protocol.vhost_user import FrontendReq
from protocol.virtio_gpu_codes import Resp
from tests.frontend.gpu_driver import GuestImage
from tests.frontend.guest_ram import PAGE_SIZE, Segment
from tests.frontend.pixels import random_pixels
from tests.frontend.session import Session
from tests.integration.conftest import BackendSpec, SessionFactory

MiB = 1 << 20


def show_and_check(s: Session, image: GuestImage, seed: int) -> None:
    """Paint, show, and compare the console with the pixels."""
    pixels = random_pixels(image.height, image.width, seed)
    image.write_pixels(s.ram, pixels)
    s.gpu.show(image)
    s.sync_display()
    assert np.array_equal(s.console.surface(0)[..., :3], pixels[..., :3])


def test_backing_in_both_regions(open_session: SessionFactory) -> None:
    """Scattered pages alternating between below-4G and above-4G regions."""
    s = open_session(split_at=32 * MiB)
    assert s.ram.regions[1].guest_phys_addr == 1 << 32
    sent = [m for m in s.frontend.log
            if m.direction == "Q->B" and m.request == FrontendReq.ADD_MEM_REG]
    assert len(sent) == 2
    image = s.gpu.create_image(128, 96, regions=[0, 1])
    assert {s.ram.region_of(seg.gpa) for seg in image.backing} == {0, 1}
    show_and_check(s, image, 31)


def test_entry_crossing_adjacent_regions(open_session: SessionFactory,
                                         backend: BackendSpec) -> None:
    """One backing entry that runs from one region into the next, adjacent one."""
    backend.require_ours("an entry must lie inside one region (vu_gpa_to_va), ERR_UNSPEC")
    s = open_session(split_at=32 * MiB, high_gpa=32 * MiB)
    rid = s.gpu.new_resource_id()
    s.gpu.create_2d(rid, 2, 64, 64).expect(Resp.OK_NODATA)
    start = 32 * MiB - 2 * PAGE_SIZE
    s.ram.alloc_at(start, 16 * 1024)
    image = GuestImage(rid, 2, 64, 64, [Segment(start, 16 * 1024)])
    s.gpu.attach_backing(rid, image.backing).expect(Resp.OK_NODATA)
    show_and_check(s, image, 32)


def test_remove_and_add_region(open_session: SessionFactory, backend: BackendSpec) -> None:
    """REM_MEM_REG of the high region; the device keeps serving; ADD_MEM_REG restores it."""
    s = open_session(split_at=32 * MiB)
    image = s.gpu.create_image(64, 64, regions=[1])
    show_and_check(s, image, 33)
    s.gpu.unref(image.resource_id).expect(Resp.OK_NODATA)
    s.remove_region(1)
    s.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)
    rid = s.gpu.new_resource_id()
    s.gpu.create_2d(rid, 2, 64, 64).expect(Resp.OK_NODATA)
    resp = s.gpu.attach_backing(rid, image.backing)
    if backend.is_ours:
        resp.expect(Resp.ERR_INVALID_PARAMETER)
    else:
        resp.expect(Resp.ERR_UNSPEC)
    s.send_memory()  # ADD_MEM_REG of region 1 again
    s.gpu.attach_backing(rid, image.backing).expect(Resp.OK_NODATA)
    show_and_check(s, GuestImage(rid, 2, 64, 64, image.backing), 34)
