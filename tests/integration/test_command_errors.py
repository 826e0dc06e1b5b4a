"""Error responses of our back-end (the reference answers differently, doc §5.3).

Each case also checks that the device keeps serving: the fixture's teardown requires a
clean exit, and most cases follow the bad command with a good one.
"""

from __future__ import annotations

import re
import time

import pytest

from protocol.display import DisplayReq
from protocol.virtio_gpu import CTRL_HDR_SIZE
from protocol.virtio_gpu_codes import Cmd, Format, Resp
from tests.frontend import gpu_commands as cmds
from tests.frontend.gpu_commands import Fence, GpuResponse, Rect
from tests.frontend.gpu_driver import GuestImage
from tests.frontend.guest_ram import PAGE_SIZE, Segment
from tests.frontend.session import Session
from tests.integration.conftest import BackendSpec

MiB = 1 << 20


@pytest.fixture(autouse=True)
def _ours_only(backend: BackendSpec) -> None:
    backend.require_ours("its error codes differ from the spec'd ones (protocol doc §5.3)")


def still_serving(s: Session) -> None:
    """The next valid command is answered."""
    s.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)


def image_without_backing(s: Session, width: int = 32, height: int = 32) -> GuestImage:
    """RESOURCE_CREATE_2D only."""
    rid = s.gpu.new_resource_id()
    s.gpu.create_2d(rid, Format.B8G8R8X8_UNORM, width, height).expect(Resp.OK_NODATA)
    return GuestImage(rid, Format.B8G8R8X8_UNORM, width, height, [])


# --- malformed commands ----------------------------------------------------------------

SHORT_BODIES = {
    Cmd.RESOURCE_CREATE_2D: cmds.resource_create_2d(1, 2, 8, 8),
    Cmd.RESOURCE_UNREF: cmds.resource_unref(1),
    Cmd.SET_SCANOUT: cmds.set_scanout(0, 1, Rect(0, 0, 8, 8)),
    Cmd.RESOURCE_FLUSH: cmds.resource_flush(1, Rect(0, 0, 8, 8)),
    Cmd.TRANSFER_TO_HOST_2D: cmds.transfer_to_host_2d(1, Rect(0, 0, 8, 8)),
    Cmd.RESOURCE_ATTACH_BACKING: cmds.attach_backing(1, 0),
    Cmd.RESOURCE_DETACH_BACKING: cmds.detach_backing(1),
    Cmd.GET_CAPSET_INFO: cmds.get_capset_info(0),
    Cmd.GET_CAPSET: cmds.get_capset(1, 0),
    Cmd.GET_EDID: cmds.get_edid(0),
}


@pytest.mark.parametrize("cmd", list(SHORT_BODIES), ids=lambda c: Cmd(c).name)
def test_command_shorter_than_its_struct(session: Session, cmd: Cmd) -> None:
    """One byte short of the struct: ERR_INVALID_PARAMETER."""
    full = SHORT_BODIES[cmd]
    if cmd == Cmd.RESOURCE_UNREF:  # make the id exist so only the length is wrong
        session.gpu.create_2d(1, 2, 8, 8).expect(Resp.OK_NODATA)
    session.gpu.run(full[:-1]).expect(Resp.ERR_INVALID_PARAMETER)
    still_serving(session)


@pytest.mark.parametrize("length", [0, 1, CTRL_HDR_SIZE - 1])
def test_command_shorter_than_the_header(session: Session, length: int) -> None:
    """Fewer than 24 bytes: ERR_INVALID_PARAMETER."""
    command = cmds.get_display_info()[:length]
    prepared = session.gpu.prepare(command or b"\0", cmds.NODATA_RESP_SIZE)
    if not command:  # a zero-length device-readable buffer
        prepared.out = [Segment(prepared.out[0].gpa, 0)]
    session.gpu.submit([prepared])[0].expect(Resp.ERR_INVALID_PARAMETER)
    still_serving(session)


@pytest.mark.parametrize("type_", [0, 0x0999, 0x1100, 0xFFFFFFFF])
def test_unknown_command_type(session: Session, type_: int) -> None:
    """An unknown command type: ERR_UNSPEC (fence fields still copied)."""
    resp = session.gpu.run(cmds.ctrl_header(type_, Fence(5, 3)) + bytes(16))
    resp.expect(Resp.ERR_UNSPEC)
    assert (resp.hdr.fence_id, resp.hdr.ctx_id) == (5, 3)
    still_serving(session)


def test_command_split_across_descriptors(session: Session) -> None:
    """A command whose struct spans several device-readable buffers is gathered."""
    command = cmds.resource_create_2d(9, Format.B8G8R8X8_UNORM, 8, 8)
    session.gpu.run(command, split_at=[3, 24, 30]).expect(Resp.OK_NODATA)
    session.gpu.run(command).expect(Resp.ERR_INVALID_RESOURCE_ID)


# --- RESOURCE_CREATE_2D ------------------------------------------------------------------


def test_create_resource_id_zero_and_duplicate(session: Session) -> None:
    """Resource id 0 and an id in use: ERR_INVALID_RESOURCE_ID."""
    gpu = session.gpu
    gpu.create_2d(0, Format.B8G8R8X8_UNORM, 8, 8).expect(Resp.ERR_INVALID_RESOURCE_ID)
    gpu.create_2d(5, Format.B8G8R8X8_UNORM, 8, 8).expect(Resp.OK_NODATA)
    gpu.create_2d(5, Format.B8G8R8X8_UNORM, 8, 8).expect(Resp.ERR_INVALID_RESOURCE_ID)


@pytest.mark.parametrize(("fmt", "width", "height"), [
    (0, 8, 8), (5, 8, 8), (66, 8, 8), (0xFFFFFFFF, 8, 8),
    (Format.B8G8R8X8_UNORM, 0, 8), (Format.B8G8R8X8_UNORM, 8, 0),
    (Format.B8G8R8X8_UNORM, 16385, 1), (Format.B8G8R8X8_UNORM, 1, 16385),
    (Format.B8G8R8X8_UNORM, 0xFFFFFFFF, 0xFFFFFFFF),
])
def test_create_bad_format_or_size(session: Session, fmt: int, width: int, height: int) -> None:
    """Unknown format, zero or > 16384 width/height: ERR_INVALID_PARAMETER."""
    session.gpu.create_2d(3, fmt, width, height).expect(Resp.ERR_INVALID_PARAMETER)
    session.gpu.create_2d(3, Format.B8G8R8X8_UNORM, 16384, 1).expect(Resp.OK_NODATA)


def test_create_over_the_host_memory_budget(session: Session) -> None:
    """256 MiB of images at most; UNREF gives the budget back."""
    gpu = session.gpu
    gpu.create_2d(1, Format.B8G8R8X8_UNORM, 16384, 16384).expect(Resp.ERR_OUT_OF_MEMORY)
    side = 5000  # 95.4 MiB each: two fit, a third does not
    gpu.create_2d(1, Format.B8G8R8X8_UNORM, side, side).expect(Resp.OK_NODATA)
    gpu.create_2d(2, Format.B8G8R8X8_UNORM, side, side).expect(Resp.OK_NODATA)
    gpu.create_2d(3, Format.B8G8R8X8_UNORM, side, side).expect(Resp.ERR_OUT_OF_MEMORY)
    gpu.unref(1).expect(Resp.OK_NODATA)
    gpu.create_2d(3, Format.B8G8R8X8_UNORM, side, side).expect(Resp.OK_NODATA)


# --- unknown resources -------------------------------------------------------------------


@pytest.mark.parametrize("command", [
    cmds.resource_unref(999),
    cmds.attach_backing(999, 1) + cmds.mem_entries([Segment(0x10000, 4096)]),
    cmds.detach_backing(999),
    cmds.transfer_to_host_2d(999, Rect(0, 0, 1, 1)),
    cmds.set_scanout(0, 999, Rect(0, 0, 1, 1)),
    cmds.resource_flush(999, Rect(0, 0, 1, 1)),
], ids=["unref", "attach", "detach", "transfer", "set_scanout", "flush"])
def test_unknown_resource(session: Session, command: bytes) -> None:
    """Any command naming a resource that does not exist: ERR_INVALID_RESOURCE_ID."""
    session.gpu.run(command).expect(Resp.ERR_INVALID_RESOURCE_ID)
    still_serving(session)


# --- ATTACH / DETACH BACKING -------------------------------------------------------------


def test_attach_when_backing_exists(session: Session) -> None:
    """A second ATTACH_BACKING: ERR_UNSPEC; the first backing stays usable."""
    image = session.gpu.create_image(16, 16)
    session.gpu.attach_backing(image.resource_id, image.backing).expect(Resp.ERR_UNSPEC)
    session.gpu.transfer(image.resource_id, Rect(0, 0, 16, 16)).expect(Resp.OK_NODATA)


def test_attach_more_entries_than_the_limit(session: Session) -> None:
    """16385 entries, all really present: ERR_INVALID_PARAMETER (limit 16384)."""
    image = image_without_backing(session, 256, 256)
    entries = [Segment(0x100000, 16)] * 16385
    session.gpu.attach_backing(image.resource_id, entries).expect(Resp.ERR_INVALID_PARAMETER)
    session.gpu.attach_backing(image.resource_id, entries[:16384]).expect(Resp.OK_NODATA)


@pytest.mark.parametrize("claimed", [6, 1 << 20, 0xFFFFFFFF])
def test_attach_entries_missing_from_the_chain(session: Session, claimed: int) -> None:
    """``nr_entries*16`` beyond the bytes present: ERR_INVALID_PARAMETER."""
    image = image_without_backing(session)
    backing = session.gpu.alloc_backing(32 * 32 * 4)
    resp = session.gpu.attach_backing(image.resource_id, backing[:5], nr_entries=claimed)
    resp.expect(Resp.ERR_INVALID_PARAMETER)
    session.gpu.attach_backing(image.resource_id, backing).expect(Resp.OK_NODATA)


def bad_entries(s: Session) -> dict[str, Segment]:
    """Entries no back-end may accept."""
    top = s.ram.regions[-1]
    return {
        "zero length": Segment(0x200000, 0),
        "unbacked": Segment(s.ram.unbacked_gpa(), PAGE_SIZE),
        "past the end of RAM": Segment(top.end - PAGE_SIZE, 2 * PAGE_SIZE),
        "wraps 2^64": Segment((1 << 64) - PAGE_SIZE, 2 * PAGE_SIZE),
    }


@pytest.mark.parametrize("case", ["zero length", "unbacked", "past the end of RAM",
                                  "wraps 2^64"])
def test_attach_bad_entry(session: Session, case: str) -> None:
    """An entry of length 0, outside RAM or wrapping 2^64: ERR_INVALID_PARAMETER."""
    image = image_without_backing(session)
    good = session.gpu.alloc_backing(32 * 32 * 4)
    entries = [*good[:2], bad_entries(session)[case], *good[2:]]
    session.gpu.attach_backing(image.resource_id, entries).expect(Resp.ERR_INVALID_PARAMETER)
    session.gpu.attach_backing(image.resource_id, good).expect(Resp.OK_NODATA)


def test_detach_without_backing(session: Session) -> None:
    """DETACH_BACKING of a resource without backing: OK_NODATA."""
    image = image_without_backing(session)
    session.gpu.detach_backing(image.resource_id).expect(Resp.OK_NODATA)
    session.gpu.detach_backing(image.resource_id).expect(Resp.OK_NODATA)


# --- TRANSFER_TO_HOST_2D -----------------------------------------------------------------


def test_transfer_without_backing(session: Session) -> None:
    """TRANSFER_TO_HOST_2D before any backing: ERR_UNSPEC."""
    image = image_without_backing(session)
    session.gpu.transfer(image.resource_id, Rect(0, 0, 8, 8)).expect(Resp.ERR_UNSPEC)


@pytest.mark.parametrize("rect", [
    Rect(0, 0, 33, 32), Rect(0, 0, 32, 33), Rect(1, 0, 32, 1), Rect(0, 31, 1, 2),
    Rect(33, 0, 0, 0), Rect(0xFFFFFFFF, 0, 2, 1), Rect(0, 0xFFFFFFFF, 1, 2),
], ids=str)
def test_transfer_rect_outside_the_resource(session: Session, rect: Rect) -> None:
    """Rectangles outside the resource (u32 wrap included): ERR_INVALID_PARAMETER."""
    image = session.gpu.create_image(32, 32)
    session.gpu.transfer(image.resource_id, rect).expect(Resp.ERR_INVALID_PARAMETER)
    session.gpu.transfer(image.resource_id, Rect(0, 0, 32, 32)).expect(Resp.OK_NODATA)


@pytest.mark.parametrize("offset", [1, 4096, 1 << 40, (1 << 64) - 4])
def test_transfer_reads_beyond_the_backing(session: Session, offset: int) -> None:
    """Source bytes past the end of the backing: ERR_INVALID_PARAMETER."""
    image = session.gpu.create_image(32, 32)  # backing is exactly 4096 bytes
    resp = session.gpu.transfer(image.resource_id, Rect(0, 0, 32, 32), offset)
    resp.expect(Resp.ERR_INVALID_PARAMETER)


def test_transfer_from_short_backing(session: Session) -> None:
    """A backing smaller than the image: transfers that need more fail, others work."""
    image = image_without_backing(session, 64, 64)
    backing = session.gpu.alloc_backing(PAGE_SIZE)  # 16 rows of 64 pixels
    session.gpu.attach_backing(image.resource_id, backing).expect(Resp.OK_NODATA)
    gpu = session.gpu
    gpu.transfer(image.resource_id, Rect(0, 0, 64, 17)).expect(Resp.ERR_INVALID_PARAMETER)
    gpu.transfer(image.resource_id, Rect(0, 0, 64, 16)).expect(Resp.OK_NODATA)


# --- SET_SCANOUT / RESOURCE_FLUSH -----------------------------------------------------------


@pytest.mark.parametrize("scanout_id", [1, 16, 0xFFFFFFFF])
def test_set_scanout_bad_scanout_id(session: Session, scanout_id: int) -> None:
    """scanout_id >= num_scanouts (1 by default): ERR_INVALID_SCANOUT_ID."""
    image = session.gpu.create_image(16, 16)
    resp = session.gpu.set_scanout(scanout_id, image.resource_id, Rect(0, 0, 16, 16))
    resp.expect(Resp.ERR_INVALID_SCANOUT_ID)
    session.sync_display()
    assert session.display.count(DisplayReq.SCANOUT) == 0


@pytest.mark.parametrize("rect", [Rect(0, 0, 0, 16), Rect(0, 0, 16, 0), Rect(0, 0, 17, 16),
                                  Rect(8, 8, 16, 16), Rect(0xFFFFFFF0, 0, 32, 16)], ids=str)
def test_set_scanout_bad_rect(session: Session, rect: Rect) -> None:
    """An empty rectangle or one outside the resource: ERR_INVALID_PARAMETER."""
    image = session.gpu.create_image(16, 16)
    session.gpu.set_scanout(0, image.resource_id, rect).expect(Resp.ERR_INVALID_PARAMETER)
    session.sync_display()
    assert session.display.count(DisplayReq.SCANOUT) == 0


@pytest.mark.parametrize("rect", [Rect(0, 0, 17, 16), Rect(16, 0, 1, 1),
                                  Rect(0, 0xFFFFFFFF, 16, 2)], ids=str)
def test_flush_rect_outside_the_resource(session: Session, rect: Rect) -> None:
    """RESOURCE_FLUSH outside the resource: ERR_INVALID_PARAMETER, no UPDATE."""
    image = session.gpu.create_image(16, 16)
    session.gpu.show(image)
    session.sync_display()
    updates = session.display.count(DisplayReq.UPDATE)
    session.gpu.flush(image.resource_id, rect).expect(Resp.ERR_INVALID_PARAMETER)
    session.sync_display()
    assert session.display.count(DisplayReq.UPDATE) == updates


# --- capsets ---------------------------------------------------------------------------------


def test_capset_info_index_out_of_range(session: Session) -> None:
    """GET_CAPSET_INFO with index >= num_capsets (0 for 2D): ERR_INVALID_PARAMETER."""
    num_capsets = session.neg.config_reads[-1].num_capsets
    resp: GpuResponse = session.gpu.get_capset_info(num_capsets)
    resp.expect(Resp.ERR_INVALID_PARAMETER)
    for index in range(num_capsets):
        session.gpu.get_capset_info(index).expect(Resp.OK_CAPSET_INFO)


def test_capset_unknown_id(session: Session) -> None:
    """GET_CAPSET of a capset that is not published: an error response, not a crash."""
    resp = session.gpu.get_capset(0xFFFF, 0, 24 + 64)
    assert resp.type >= Resp.ERR_UNSPEC, resp.type_name
    still_serving(session)


# --- a guest repeating errors -------------------------------------------------------------


def test_a_flood_of_bad_commands_is_answered_but_not_all_logged(session: Session) -> None:
    """3,200 unknown commands: each answered ERR_UNSPEC, but the log gets only the
    burst of the line of code (--log-rate 20: 100 lines) and ~20 a second after it,
    which carry the counts of the rest; what is pending is named when the back-end
    exits."""
    flood, batch = 3200, 32
    started = time.monotonic()
    for _ in range(flood // batch):
        answers = session.gpu.submit([session.gpu.prepare(cmds.ctrl_header(0x0999))
                                      for _ in range(batch)])
        assert {a.type for a in answers} == {Resp.ERR_UNSPEC}
    refills = 20 * (time.monotonic() - started)
    still_serving(session)
    session.close()
    stderr = session.backend.stderr
    logged = stderr.count("vgpu_backend.device: guest error: command 0x999")
    assert 100 <= logged <= 100 + refills + 1, stderr[-2000:]
    counted = sum(int(n) for n in re.findall(r"\[(\d+) more from here suppressed\]", stderr))
    # the last command may have come with a fresh token: then nothing is pending at exit
    at_exit = re.search(r"lines suppressed by --log-rate: (\d+) from vgpu_backend\.device:\d+ "
                        r"\(last: 'guest error: command 0x999: ", stderr)
    assert logged + counted + (int(at_exit.group(1)) if at_exit else 0) == flood, \
        stderr[-2000:]
