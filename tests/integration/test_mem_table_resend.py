"""SET_MEM_TABLE without CONFIGURE_MEM_SLOTS: QEMU re-sends the whole table at every
start (VM cont).  An unchanged table must not invalidate anything; a changed one must
drop exactly what lived in the regions that went away."""

from __future__ import annotations

import numpy as np
import pytest

from protocol.vhost_user import ProtocolFeature
from protocol.virtio_gpu_codes import Resp
from tests.frontend.gpu_commands import Rect
from tests.frontend.guest_ram import QEMU_VA_BASE, RamRegion
from tests.frontend.pixels import random_pixels
from tests.integration.conftest import BackendSpec, SessionFactory

NO_MEM_SLOTS = int(ProtocolFeature.CONFIGURE_MEM_SLOTS)


def ours_only(backend: BackendSpec) -> None:
    """The C reference re-maps every region and keeps pointers into the old mappings;
    what it does then is not under test here."""
    if not backend.is_ours:
        pytest.skip("reference: remaps all regions on SET_MEM_TABLE (behaviour not tested)")


def test_unchanged_table_keeps_backing(open_session: SessionFactory,
                                       backend: BackendSpec) -> None:
    """Stop/cont re-sends the identical table: the image keeps its guest pages."""
    ours_only(backend)
    s = open_session(refuse_protocol=NO_MEM_SLOTS, split_at=16 << 20, high_gpa=16 << 20)
    image = s.gpu.create_image(64, 64, regions=[0, 1])
    image.write_pixels(s.ram, random_pixels(64, 64, 1))
    s.gpu.show(image)
    s.stop()
    s.cont()
    sent = [m.name for m in s.frontend.log if m.direction == "Q->B"]
    assert sent.count("SET_MEM_TABLE") == 2
    second = random_pixels(64, 64, 2)
    image.write_pixels(s.ram, second)
    full = Rect(0, 0, 64, 64)
    s.gpu.transfer(image.resource_id, full).expect(Resp.OK_NODATA)
    s.gpu.flush(image.resource_id, full).expect(Resp.OK_NODATA)
    s.sync_display()
    assert np.array_equal(s.console.surface(0)[..., :3], second[..., :3])


def test_changed_table_drops_backing_in_removed_region(open_session: SessionFactory,
                                                       backend: BackendSpec) -> None:
    """A table without the high region: images with pages there lose their backing
    (TRANSFER answers ERR_UNSPEC), images entirely in the kept region keep working."""
    ours_only(backend)
    s = open_session(refuse_protocol=NO_MEM_SLOTS, split_at=16 << 20, high_gpa=16 << 20)
    low = s.gpu.create_image(32, 32, regions=[0])
    high = s.gpu.create_image(32, 32, regions=[1])
    s.frontend.set_mem_table(s.ram.regions[:1], s.ram.fd)
    full = Rect(0, 0, 32, 32)
    s.gpu.transfer(low.resource_id, full).expect(Resp.OK_NODATA)
    s.gpu.transfer(high.resource_id, full).expect(Resp.ERR_UNSPEC)


def test_a_table_that_remaps_the_rings_region_keeps_the_queues_serving(
        open_session: SessionFactory, backend: BackendSpec) -> None:
    """The region the rings live in is replaced (the same RAM, now cut in two): the
    device maps its rings again from the new table and answers the next commands."""
    ours_only(backend)
    s = open_session(refuse_protocol=NO_MEM_SLOTS)
    half = s.ram.size // 2
    s.frontend.set_mem_table([RamRegion(0, half, 0, QEMU_VA_BASE),
                              RamRegion(half, s.ram.size - half, half, QEMU_VA_BASE + half)],
                             s.ram.fd)
    image = s.gpu.create_image(32, 32)
    image.write_pixels(s.ram, random_pixels(32, 32, 3))
    s.gpu.transfer(image.resource_id, Rect(0, 0, 32, 32)).expect(Resp.OK_NODATA)
    s.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)
