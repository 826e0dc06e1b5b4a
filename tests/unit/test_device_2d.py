"""The 2D command set through ``VirtioGpuDevice.process()`` with rings in guest RAM.

Expected codes follow ``vgpu_backend/commands_2d.py`` and ``resources.py``; where they
differ from QEMU's built-in device or the C reference back-end the test says so.
"""

from __future__ import annotations

import struct
from typing import Any

import numpy as np
import pytest

from protocol.display import (
    DisplayReq,
    decode_display_info,
)
from protocol.edid import build_edid
from protocol.limits import Limits
from protocol.virtio_gpu import (
    CTRL_HDR_SIZE,
    DisplayOne,
    GetCapset,
    GetCapsetInfo,
    GetEdid,
    ResourceAssignUuid,
    ResourceCreate2d,
    ResourceDetachBacking,
    ResourceUnref,
    RespCapsetInfo,
    TransferToHost2d,
    UpdateCursor,
)
from protocol.virtio_gpu_codes import Cmd, CtrlFlag, Format, Resp
from protocol.virtqueue import DescFlag
from protocol.wire import decode
from tests.unit.device_harness import (
    BACKING_BASE,
    DeviceHarness,
    code,
    command,
    edid_of,
    mem_entries,
    peer_of,
)
from tests.unit.loop_runner import run_until
from vgpu_backend.device_state import Capset
from vgpu_backend.resources import Image2D

RESPONSE_HDR = struct.Struct("<IIQIB3x")


def image_of(harness: DeviceHarness, resource_id: int) -> np.ndarray:
    res = harness.device.state.resources.get(resource_id)
    assert isinstance(res, Image2D)
    return res.image


# --- display info, EDID -----------------------------------------------------------


def test_get_display_info_without_a_display_reports_the_default_mode(
        dev: DeviceHarness) -> None:
    response = dev.run(command(Cmd.GET_DISPLAY_INFO))
    assert response.type == Resp.OK_DISPLAY_INFO and response.written == 408
    modes = decode_display_info(response.raw[:408])
    assert modes[0] == DisplayOne(0, 0, 1280, 800, 1, 0)
    assert all(m.enabled == 0 for m in modes[1:])


def test_get_display_info_asks_the_display(shown: DeviceHarness) -> None:
    peer = peer_of(shown)
    peer.modes = [DisplayOne(0, 0, 1024, 768, 1, 0), DisplayOne(0, 0, 640, 480, 1, 0)]
    response = shown.run(command(Cmd.GET_DISPLAY_INFO))
    assert response.type == Resp.OK_DISPLAY_INFO
    assert decode_display_info(response.raw[:408])[:2] == peer.modes
    assert len(peer.of(DisplayReq.GET_DISPLAY_INFO)) == 1
    assert shown.device.state.num_scanouts == 2  # QEMU reports a second output


def test_get_display_info_falls_back_when_the_display_is_silent() -> None:
    harness = DeviceHarness(limits=Limits(display_reply_timeout=0.05), display=True)
    try:
        peer_of(harness).answer_display_info = False
        first = harness.submit(command(Cmd.GET_DISPLAY_INFO))
        assert first == []  # held until the display answers or times out
        harness.submit(command(Cmd.RESOURCE_CREATE_2D, ResourceCreate2d(1, 2, 4, 4)))
        run_until(harness.loop, lambda: harness.control.used_idx() == 2)
        got = harness.collect()
        assert [Resp(r.type).name for r in got] == ["OK_DISPLAY_INFO", "OK_NODATA"]
        assert decode_display_info(got[0].raw[:408])[0] == DisplayOne(0, 0, 1280, 800, 1, 0)
        assert harness.device.internal_errors == 0
    finally:
        harness.close()


def test_get_edid(dev: DeviceHarness) -> None:
    response = dev.run(command(Cmd.GET_EDID, GetEdid(0)), response_size=2048)
    assert response.type == Resp.OK_EDID and response.written == 1056
    size = struct.unpack_from("<I", response.body)[0]
    assert response.body[8:8 + size] == build_edid(1280, 800, serial=0)
    assert response.body[8 + size:] == bytes(1024 - size)
    assert code(dev, command(Cmd.GET_EDID, GetEdid(1))) == "ERR_INVALID_PARAMETER"


def test_get_edid_uses_each_scanouts_mode_up_to_the_size_limit() -> None:
    """QEMU's modes exactly at ``max_dimension`` are used (as wide and as high), and the
    serial number is the scanout's index."""
    limit = 2000
    harness = DeviceHarness(limits=Limits(max_hostmem=16 << 20, max_dimension=limit),
                            display=True)
    try:
        peer_of(harness).modes = [DisplayOne(0, 0, limit, 600, 1, 0),
                                  DisplayOne(0, 0, 800, limit, 1, 0)]
        assert harness.run(command(Cmd.GET_DISPLAY_INFO)).type == Resp.OK_DISPLAY_INFO
        assert edid_of(harness, 0) == build_edid(limit, 600, serial=0)
        assert edid_of(harness, 1) == build_edid(800, limit, serial=1)
        assert harness.device.internal_errors == 0
    finally:
        harness.close()


# --- fences and headers ------------------------------------------------------------


@pytest.mark.parametrize("flags, ring_idx_echoed", [
    (CtrlFlag.FENCE, False), (CtrlFlag.FENCE | CtrlFlag.INFO_RING_IDX, True)])
@pytest.mark.parametrize("cmd", [command(Cmd.RESOURCE_UNREF, ResourceUnref(77)),
                                 command(Cmd.GET_DISPLAY_INFO)], ids=["error", "ok"])
def test_fence_is_echoed(dev: DeviceHarness, flags: int, ring_idx_echoed: bool,
                         cmd: bytes) -> None:
    type_ = struct.unpack_from("<I", cmd)[0]
    fenced = command(type_, cmd[CTRL_HDR_SIZE:], flags=flags, fence_id=0x1122334455667788,
                     ctx_id=7, ring_idx=3)
    hdr = dev.run(fenced).hdr
    assert (hdr.flags, hdr.fence_id, hdr.ctx_id) == (flags, 0x1122334455667788, 7)
    assert hdr.ring_idx == (3 if ring_idx_echoed else 0)
    assert hdr.padding == b"\0\0\0"


def test_no_fence_no_echo(dev: DeviceHarness) -> None:
    hdr = dev.run(command(Cmd.GET_DISPLAY_INFO, fence_id=99, ctx_id=5, ring_idx=2,
                          flags=0x80)).hdr
    assert (hdr.flags, hdr.fence_id, hdr.ctx_id, hdr.ring_idx) == (0, 0, 0, 0)


# --- RESOURCE_CREATE_2D / UNREF ------------------------------------------------------


def test_create_2d_errors(dev: DeviceHarness) -> None:
    dev.ok(command(Cmd.RESOURCE_CREATE_2D, ResourceCreate2d(1, 2, 64, 64)))
    cases = {
        ResourceCreate2d(0, 2, 4, 4): "ERR_INVALID_RESOURCE_ID",
        ResourceCreate2d(1, 2, 4, 4): "ERR_INVALID_RESOURCE_ID",  # in use
        ResourceCreate2d(2, 5, 4, 4): "ERR_INVALID_PARAMETER",  # unknown format
        ResourceCreate2d(2, 2, 0, 4): "ERR_INVALID_PARAMETER",
        ResourceCreate2d(2, 2, 4, 0): "ERR_INVALID_PARAMETER",
        ResourceCreate2d(2, 2, 16385, 1): "ERR_INVALID_PARAMETER",
        ResourceCreate2d(2, 2, 0xFFFF_FFFF, 0xFFFF_FFFF): "ERR_INVALID_PARAMETER",
        ResourceCreate2d(2, 2, 4096, 4096): "ERR_OUT_OF_MEMORY",  # 64 MiB > 16 MiB budget
    }
    for body, expected in cases.items():
        assert code(dev, command(Cmd.RESOURCE_CREATE_2D, body)) == expected, body
    assert len(dev.device.state.resources) == 1


@pytest.mark.parametrize("fmt", list(Format), ids=lambda f: f.name)
def test_create_2d_accepts_every_format(dev: DeviceHarness, fmt: Format) -> None:
    dev.ok(command(Cmd.RESOURCE_CREATE_2D, ResourceCreate2d(3, fmt, 2, 2)))


def test_resource_count_limit() -> None:
    harness = DeviceHarness(limits=Limits(max_resources=2))
    try:
        for rid in (1, 2):
            harness.ok(command(Cmd.RESOURCE_CREATE_2D, ResourceCreate2d(rid, 2, 1, 1)))
        assert code(harness, command(Cmd.RESOURCE_CREATE_2D, ResourceCreate2d(3, 2, 1, 1))) \
            == "ERR_OUT_OF_MEMORY"
    finally:
        harness.close()


def test_unref_frees_the_id_and_the_budget(dev: DeviceHarness) -> None:
    big = ResourceCreate2d(1, 2, 2048, 1536)  # 12 MiB of a 16 MiB budget
    dev.ok(command(Cmd.RESOURCE_CREATE_2D, big))
    assert code(dev, command(Cmd.RESOURCE_CREATE_2D, big._replace(resource_id=2))) == \
        "ERR_OUT_OF_MEMORY"
    dev.ok(command(Cmd.RESOURCE_UNREF, ResourceUnref(1)))
    dev.ok(command(Cmd.RESOURCE_CREATE_2D, big._replace(resource_id=2)))
    dev.ok(command(Cmd.RESOURCE_CREATE_2D, big._replace(resource_id=1, width=16)))
    assert code(dev, command(Cmd.RESOURCE_UNREF, ResourceUnref(9))) == \
        "ERR_INVALID_RESOURCE_ID"


def test_a_failed_allocation_gives_its_budget_back(dev: DeviceHarness,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    big = ResourceCreate2d(1, 2, 2048, 1536)  # 12 MiB of a 16 MiB budget
    real_zeros = np.zeros

    def zeros_failing_once(shape: object, *args: Any, **kwargs: Any) -> Any:
        if shape == (1536, 2048 * 4):  # the image of ``big``
            monkeypatch.setattr(np, "zeros", real_zeros)
            raise MemoryError("host memory")
        return real_zeros(shape, *args, **kwargs)
    monkeypatch.setattr(np, "zeros", zeros_failing_once)
    before = dev.device.state.resources.hostmem_used
    assert code(dev, command(Cmd.RESOURCE_CREATE_2D, big)) == "ERR_OUT_OF_MEMORY"
    assert np.zeros is real_zeros  # the allocation was really tried
    assert dev.device.state.resources.hostmem_used == before
    assert len(dev.device.state.resources) == 0
    dev.ok(command(Cmd.RESOURCE_CREATE_2D, big))


# --- backing ---------------------------------------------------------------------------


def attach(resource_id: int, count: int, entries: bytes) -> bytes:
    return command(Cmd.RESOURCE_ATTACH_BACKING, struct.pack("<II", resource_id, count) + entries)


def test_attach_backing_errors(dev: DeviceHarness) -> None:
    dev.ok(command(Cmd.RESOURCE_CREATE_2D, ResourceCreate2d(1, 2, 16, 16)))
    one = mem_entries((BACKING_BASE, 1024))
    # QEMU and the C reference answer ERR_UNSPEC to every bad entry list; this
    # back-end answers ERR_INVALID_PARAMETER (reported, not a bug)
    cases = [
        (attach(2, 1, one), "ERR_INVALID_RESOURCE_ID"),
        (attach(1, 0, b""), "ERR_INVALID_PARAMETER"),
        (attach(1, 2, one), "ERR_INVALID_PARAMETER"),  # entries missing from the chain
        (attach(1, 16385, one), "ERR_INVALID_PARAMETER"),  # over QEMU's 16384 cap
        (attach(1, 0xFFFF_FFFF, one), "ERR_INVALID_PARAMETER"),
        (attach(1, 1, mem_entries((0x4000_0000, 4096))), "ERR_INVALID_PARAMETER"),
        (attach(1, 1, mem_entries(((1 << 64) - 16, 32))), "ERR_INVALID_PARAMETER"),
        (attach(1, 1, mem_entries((BACKING_BASE, 0))), "ERR_INVALID_PARAMETER"),
    ]
    for cmd, expected in cases:
        assert code(dev, cmd) == expected
    assert image_of(dev, 1) is not None
    dev.ok(attach(1, 2, mem_entries((BACKING_BASE, 512), (BACKING_BASE + 8192, 512))))
    assert code(dev, attach(1, 1, one)) == "ERR_UNSPEC"  # already has backing (as QEMU)


def test_detach_backing(dev: DeviceHarness) -> None:
    dev.create_2d(1, 4, 4)
    dev.ok(command(Cmd.RESOURCE_DETACH_BACKING, ResourceDetachBacking(1)))
    transfer = command(Cmd.TRANSFER_TO_HOST_2D, TransferToHost2d(0, 0, 4, 4, 0, 1))
    assert code(dev, transfer) == "ERR_UNSPEC"
    # no backing: nothing to do (QEMU's built-in device agrees; the C reference answers
    # ERR_INVALID_RESOURCE_ID)
    dev.ok(command(Cmd.RESOURCE_DETACH_BACKING, ResourceDetachBacking(1)))
    assert code(dev, command(Cmd.RESOURCE_DETACH_BACKING, ResourceDetachBacking(2))) == \
        "ERR_INVALID_RESOURCE_ID"
    dev.ok(attach(1, 1, mem_entries((BACKING_BASE, 64))))


# --- TRANSFER_TO_HOST_2D ------------------------------------------------------------


def model_transfer(image: np.ndarray, backing: bytes, x: int, y: int, w: int, h: int,
                   offset: int, stride: int) -> None:
    """QEMU's row loop: row ``k`` comes from ``offset + k * stride``."""
    for k in range(h):
        src = offset + k * stride
        image[y + k, x * 4:(x + w) * 4] = np.frombuffer(backing[src:src + w * 4], np.uint8)


@pytest.mark.parametrize("rect", [(0, 0, 16, 8), (0, 2, 16, 3), (3, 1, 5, 4), (15, 7, 1, 1),
                                  (0, 1, 8, 3), (0, 0, 0, 0)])
def test_transfer_to_host_2d_copies_like_qemu(dev: DeviceHarness,
                                              rect: tuple[int, int, int, int]) -> None:
    width, height, stride = 16, 8, 64
    rng = np.random.default_rng(sum(rect))
    guest = rng.integers(0, 256, size=width * height * 4, dtype=np.uint8).tobytes()
    # backing in three pieces, scattered, the middle one at an unaligned address
    pieces = [(BACKING_BASE + 0x3000, 100), (BACKING_BASE + 0x1003, 300),
              (BACKING_BASE, len(guest) - 400)]
    pos = 0
    for addr, length in pieces:
        dev.ram.write(addr, guest[pos:pos + length])
        pos += length
    dev.ok(command(Cmd.RESOURCE_CREATE_2D, ResourceCreate2d(1, 2, width, height)))
    dev.ok(attach(1, 3, mem_entries(*pieces)))
    x, y, w, h = rect
    offset = y * stride + x * 4
    dev.ok(command(Cmd.TRANSFER_TO_HOST_2D, TransferToHost2d(x, y, w, h, offset, 1)))
    expected = np.zeros((height, stride), np.uint8)
    model_transfer(expected, guest, x, y, w, h, offset, stride)
    assert np.array_equal(image_of(dev, 1), expected)


@pytest.mark.parametrize("rect", [(0, 3, 16, 0), (2, 1, 8, 0), (3, 1, 0, 4)])
def test_a_zero_area_transfer_reads_nothing(dev: DeviceHarness,
                                            rect: tuple[int, int, int, int]) -> None:
    """Nothing is read: even an offset far past the backing is fine, and the image
    keeps its pixels."""
    dev.ram.write(BACKING_BASE, bytes(range(256)) * 2)
    dev.create_2d(1, 16, 8)
    dev.ok(command(Cmd.TRANSFER_TO_HOST_2D, TransferToHost2d(0, 0, 16, 8, 0, 1)))
    before = image_of(dev, 1).copy()
    dev.ok(command(Cmd.TRANSFER_TO_HOST_2D, TransferToHost2d(*rect, 1 << 20, 1)))
    assert np.array_equal(image_of(dev, 1), before)


@pytest.mark.parametrize("rect", [(0, 1, 8, 8), (4, 0, 8, 8), (0, 0, 9, 1), (7, 7, 2, 2)])
def test_transfer_rect_outside_the_resource_with_a_large_backing(
        dev: DeviceHarness, rect: tuple[int, int, int, int]) -> None:
    """The backing has bytes for the rectangle: only the rect check can refuse it."""
    dev.ok(command(Cmd.RESOURCE_CREATE_2D, ResourceCreate2d(1, 2, 8, 8)))
    dev.ok(attach(1, 1, mem_entries((BACKING_BASE, 64 * 1024))))
    body = TransferToHost2d(*rect, 0, 1)
    assert code(dev, command(Cmd.TRANSFER_TO_HOST_2D, body)) == "ERR_INVALID_PARAMETER"


def test_transfer_errors(dev: DeviceHarness) -> None:
    dev.create_2d(1, 8, 8)
    dev.ok(command(Cmd.RESOURCE_CREATE_2D, ResourceCreate2d(2, 2, 8, 8)))
    cases = [
        (TransferToHost2d(0, 0, 8, 8, 0, 3), "ERR_INVALID_RESOURCE_ID"),
        (TransferToHost2d(0, 0, 8, 8, 0, 2), "ERR_UNSPEC"),  # no backing
        (TransferToHost2d(1, 0, 8, 8, 0, 1), "ERR_INVALID_PARAMETER"),
        (TransferToHost2d(0, 0, 8, 9, 0, 1), "ERR_INVALID_PARAMETER"),
        (TransferToHost2d(0xFFFF_FFFF, 0, 2, 1, 0, 1), "ERR_INVALID_PARAMETER"),
        (TransferToHost2d(0, 0xFFFF_FFFF, 1, 2, 0, 1), "ERR_INVALID_PARAMETER"),
        (TransferToHost2d(0, 0, 8, 8, 4, 1), "ERR_INVALID_PARAMETER"),  # past the backing
        (TransferToHost2d(0, 0, 8, 1, (1 << 64) - 1, 1), "ERR_INVALID_PARAMETER"),
    ]
    for body, expected in cases:
        assert code(dev, command(Cmd.TRANSFER_TO_HOST_2D, body)) == expected, body


# --- capsets, UUIDs, unknown and malformed commands --------------------------------------


def test_capsets(dev: DeviceHarness) -> None:
    assert code(dev, command(Cmd.GET_CAPSET_INFO, GetCapsetInfo(0))) == "ERR_INVALID_PARAMETER"
    dev.device.state.capsets.append(Capset(0x5650, 2, b"capset-bytes"))
    info = dev.run(command(Cmd.GET_CAPSET_INFO, GetCapsetInfo(0)))
    assert info.type == Resp.OK_CAPSET_INFO
    assert decode(RespCapsetInfo, info.body) == RespCapsetInfo(0x5650, 2, 12)
    capset = dev.run(command(Cmd.GET_CAPSET, GetCapset(0x5650, 1)))
    assert (capset.type, capset.body) == (Resp.OK_CAPSET, b"capset-bytes")
    assert code(dev, command(Cmd.GET_CAPSET, GetCapset(0x5650, 3))) == "ERR_INVALID_PARAMETER"
    assert code(dev, command(Cmd.GET_CAPSET, GetCapset(1, 1))) == "ERR_INVALID_PARAMETER"
    assert code(dev, command(Cmd.GET_CAPSET_INFO, GetCapsetInfo(1))) == "ERR_INVALID_PARAMETER"


def test_assign_uuid(dev: DeviceHarness) -> None:
    assert code(dev, command(Cmd.RESOURCE_ASSIGN_UUID, ResourceAssignUuid(1))) == \
        "ERR_INVALID_RESOURCE_ID"
    dev.create_2d(1, 2, 2, backing_gpa=None)
    first = dev.run(command(Cmd.RESOURCE_ASSIGN_UUID, ResourceAssignUuid(1)))
    second = dev.run(command(Cmd.RESOURCE_ASSIGN_UUID, ResourceAssignUuid(1)))
    assert first.type == Resp.OK_RESOURCE_UUID and len(first.body) == 16
    assert first.body == second.body != bytes(16)


@pytest.mark.parametrize("cmd_type", [0, 0x0099, Cmd.RESOURCE_CREATE_BLOB, Cmd.SET_SCANOUT_BLOB,
                                      Cmd.UPDATE_CURSOR, Resp.OK_NODATA, 0xFFFF_FFFF])
def test_unsupported_commands_get_err_unspec(dev: DeviceHarness, cmd_type: int) -> None:
    assert code(dev, command(cmd_type, bytes(96))) == "ERR_UNSPEC"


@pytest.mark.parametrize("cmd_type, body_size", [
    (Cmd.RESOURCE_CREATE_2D, 15), (Cmd.SET_SCANOUT, 23), (Cmd.TRANSFER_TO_HOST_2D, 31),
    (Cmd.RESOURCE_ATTACH_BACKING, 7), (Cmd.GET_EDID, 0), (Cmd.RESOURCE_FLUSH, 20)])
def test_short_commands_get_invalid_parameter(dev: DeviceHarness, cmd_type: int,
                                              body_size: int) -> None:
    assert code(dev, command(cmd_type, bytes(body_size))) == "ERR_INVALID_PARAMETER"


@pytest.mark.parametrize("size", [0, 1, 23])
def test_a_command_shorter_than_its_header(dev: DeviceHarness, size: int) -> None:
    raw = command(Cmd.GET_DISPLAY_INFO)[:size]
    if size == 0:  # a zero-length readable descriptor carries no buffer at all
        raw = b""
    response = dev.run(raw)
    assert response.type == Resp.ERR_INVALID_PARAMETER


def test_a_small_response_buffer_truncates_the_response(dev: DeviceHarness) -> None:
    response = dev.run(command(Cmd.GET_DISPLAY_INFO), response_size=8)
    assert response.written == 8
    assert struct.unpack_from("<I", response.raw)[0] == Resp.OK_DISPLAY_INFO


def test_a_bad_readable_buffer_gets_an_error_response(dev: DeviceHarness) -> None:
    next_, write = int(DescFlag.NEXT), int(DescFlag.WRITE)
    dev.control.set_desc(0, 0x4000_0000, 24, next_, 1)  # not guest RAM
    dev.control.set_desc(1, 0x90000, 24, write)
    dev.control.publish(0)
    dev.device.process(0)
    assert dev.control.take_used() == [(0, 24)]
    assert struct.unpack_from("<I", dev.ram.read(0x90000, 4))[0] == Resp.ERR_INVALID_PARAMETER
    assert dev.run(command(Cmd.GET_DISPLAY_INFO)).type == Resp.OK_DISPLAY_INFO


def test_a_bad_writable_buffer_is_used_with_length_zero(dev: DeviceHarness) -> None:
    next_, write = int(DescFlag.NEXT), int(DescFlag.WRITE)
    dev.ram.write(0x10000, command(Cmd.GET_DISPLAY_INFO))
    dev.control.set_desc(0, 0x10000, 24, next_, 1)
    dev.control.set_desc(1, 0x4000_0000, 408, write)  # not guest RAM
    dev.control.publish(0)
    dev.device.process(0)
    assert dev.control.take_used() == [(0, 0)]
    assert dev.device.queues[0].ready
    assert dev.run(command(Cmd.GET_DISPLAY_INFO)).type == Resp.OK_DISPLAY_INFO


def test_a_corrupt_ring_breaks_only_that_ring(dev: DeviceHarness) -> None:
    dev.control.publish(64)  # head out of range
    dev.device.process(0)
    assert dev.device.queues[0].broken and dev.control.take_used() == []
    dev.cursor_command(command(Cmd.MOVE_CURSOR, UpdateCursor(0, 1, 1, 0, 0, 0, 0)))
    assert dev.cursor.take_used() == [(0, 0)]  # the cursor queue still works
    assert dev.control.interrupts() == 0
