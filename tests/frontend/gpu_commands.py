"""virtio-gpu command bytes as a guest driver builds them, and decoded responses.

Pure functions over :mod:`protocol.virtio_gpu`; :mod:`tests.frontend.gpu_driver` puts
the bytes into guest RAM and onto the rings.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import NamedTuple

from protocol.virtio_gpu import (
    CTRL_HDR_SIZE,
    EDID_BLOB_SIZE,
    MAX_SCANOUTS,
    CtrlHdr,
    DisplayOne,
    GetCapset,
    GetCapsetInfo,
    GetEdid,
    MemEntry,
    ResourceAttachBacking,
    ResourceCreate2d,
    ResourceDetachBacking,
    ResourceFlush,
    ResourceUnref,
    RespCapsetInfo,
    RespEdidHeader,
    SetScanout,
    TransferToHost2d,
    UpdateCursor,
)
from protocol.virtio_gpu_codes import Cmd, CtrlFlag, Resp
from protocol.wire import decode, encode, layout
from tests.frontend.guest_ram import Segment

__all__ = [
    "DISPLAY_INFO_RESP_SIZE",
    "EDID_RESP_SIZE",
    "NODATA_RESP_SIZE",
    "Fence",
    "GpuResponse",
    "Rect",
    "attach_backing",
    "ctrl_header",
    "cursor_command",
    "detach_backing",
    "get_capset",
    "get_capset_info",
    "get_display_info",
    "get_edid",
    "mem_entries",
    "resource_create_2d",
    "resource_flush",
    "resource_unref",
    "set_scanout",
    "transfer_to_host_2d",
]

NODATA_RESP_SIZE = CTRL_HDR_SIZE
DISPLAY_INFO_RESP_SIZE = CTRL_HDR_SIZE + MAX_SCANOUTS * layout(DisplayOne).size
EDID_RESP_SIZE = CTRL_HDR_SIZE + layout(RespEdidHeader).size + EDID_BLOB_SIZE
CAPSET_INFO_RESP_SIZE = CTRL_HDR_SIZE + layout(RespCapsetInfo).size


class Rect(NamedTuple):
    """``struct virtio_gpu_rect``."""

    x: int
    y: int
    width: int
    height: int


@dataclass(frozen=True, slots=True)
class Fence:
    """Fence fields of a command header."""

    fence_id: int
    ctx_id: int = 0
    ring_idx: int | None = None  # set -> VIRTIO_GPU_FLAG_INFO_RING_IDX


def ctrl_header(cmd: int, fence: Fence | None = None) -> bytes:
    """``struct virtio_gpu_ctrl_hdr`` for ``cmd`` (fenced when ``fence`` is given)."""
    if fence is None:
        return encode(CtrlHdr(cmd))
    flags = CtrlFlag.FENCE | (CtrlFlag.INFO_RING_IDX if fence.ring_idx is not None else 0)
    return encode(CtrlHdr(cmd, int(flags), fence.fence_id, fence.ctx_id,
                          fence.ring_idx or 0))


def get_display_info(fence: Fence | None = None) -> bytes:
    """GET_DISPLAY_INFO."""
    return ctrl_header(Cmd.GET_DISPLAY_INFO, fence)


def get_edid(scanout: int, fence: Fence | None = None) -> bytes:
    """GET_EDID."""
    return ctrl_header(Cmd.GET_EDID, fence) + encode(GetEdid(scanout))


def resource_create_2d(resource_id: int, fmt: int, width: int, height: int,
                       fence: Fence | None = None) -> bytes:
    """RESOURCE_CREATE_2D."""
    return ctrl_header(Cmd.RESOURCE_CREATE_2D, fence) + encode(
        ResourceCreate2d(resource_id, fmt, width, height))


def resource_unref(resource_id: int, fence: Fence | None = None) -> bytes:
    """RESOURCE_UNREF."""
    return ctrl_header(Cmd.RESOURCE_UNREF, fence) + encode(ResourceUnref(resource_id))


def mem_entries(entries: Sequence[Segment]) -> bytes:
    """The ``virtio_gpu_mem_entry`` array of ATTACH_BACKING."""
    return b"".join(encode(MemEntry(e.gpa, e.length)) for e in entries)


def attach_backing(resource_id: int, nr_entries: int, fence: Fence | None = None) -> bytes:
    """RESOURCE_ATTACH_BACKING header (the entries follow, see :func:`mem_entries`)."""
    return ctrl_header(Cmd.RESOURCE_ATTACH_BACKING, fence) + encode(
        ResourceAttachBacking(resource_id, nr_entries))


def detach_backing(resource_id: int, fence: Fence | None = None) -> bytes:
    """RESOURCE_DETACH_BACKING."""
    return ctrl_header(Cmd.RESOURCE_DETACH_BACKING, fence) + encode(
        ResourceDetachBacking(resource_id))


def transfer_to_host_2d(resource_id: int, rect: Rect, offset: int = 0,
                        fence: Fence | None = None) -> bytes:
    """TRANSFER_TO_HOST_2D."""
    return ctrl_header(Cmd.TRANSFER_TO_HOST_2D, fence) + encode(
        TransferToHost2d(*rect, offset, resource_id))


def set_scanout(scanout_id: int, resource_id: int, rect: Rect,
                fence: Fence | None = None) -> bytes:
    """SET_SCANOUT."""
    return ctrl_header(Cmd.SET_SCANOUT, fence) + encode(
        SetScanout(*rect, scanout_id, resource_id))


def resource_flush(resource_id: int, rect: Rect, fence: Fence | None = None) -> bytes:
    """RESOURCE_FLUSH."""
    return ctrl_header(Cmd.RESOURCE_FLUSH, fence) + encode(ResourceFlush(*rect, resource_id))


def get_capset_info(index: int, fence: Fence | None = None) -> bytes:
    """GET_CAPSET_INFO."""
    return ctrl_header(Cmd.GET_CAPSET_INFO, fence) + encode(GetCapsetInfo(index))


def get_capset(capset_id: int, version: int, fence: Fence | None = None) -> bytes:
    """GET_CAPSET."""
    return ctrl_header(Cmd.GET_CAPSET, fence) + encode(GetCapset(capset_id, version))


def cursor_command(cmd: int, scanout_id: int, x: int, y: int, *, resource_id: int = 0,
                   hot_x: int = 0, hot_y: int = 0) -> bytes:
    """UPDATE_CURSOR / MOVE_CURSOR (``struct virtio_gpu_update_cursor``, 56 bytes)."""
    return ctrl_header(cmd) + encode(UpdateCursor(scanout_id, x, y, 0, resource_id,
                                                  hot_x, hot_y))


@dataclass(frozen=True, slots=True)
class GpuResponse:
    """A completed control command: the response buffer and the used length."""

    raw: bytes
    used_len: int
    head: int

    @property
    def hdr(self) -> CtrlHdr:
        """The response header."""
        return decode(CtrlHdr, self.raw)

    @property
    def type(self) -> int:
        """``VIRTIO_GPU_RESP_*`` code."""
        return self.hdr.type

    @property
    def type_name(self) -> str:
        """Response name for assertion messages."""
        try:
            return Resp(self.type).name
        except ValueError:
            return f"{self.type:#x}"

    def expect(self, code: Resp) -> GpuResponse:
        """Assert the response type (and that a header was really written)."""
        assert self.type == code, f"expected {code.name}, got {self.type_name}"
        assert self.used_len >= CTRL_HDR_SIZE, f"used len {self.used_len} < header size"
        return self

    def display_modes(self) -> list[DisplayOne]:
        """The 16 pmodes of an OK_DISPLAY_INFO response."""
        self.expect(Resp.OK_DISPLAY_INFO)
        return [decode(DisplayOne, self.raw, CTRL_HDR_SIZE + i * layout(DisplayOne).size)
                for i in range(MAX_SCANOUTS)]

    def edid(self) -> bytes:
        """The EDID blob of an OK_EDID response (``size`` bytes)."""
        self.expect(Resp.OK_EDID)
        size = decode(RespEdidHeader, self.raw, CTRL_HDR_SIZE).size
        start = CTRL_HDR_SIZE + layout(RespEdidHeader).size
        assert size <= EDID_BLOB_SIZE, f"EDID size {size} > {EDID_BLOB_SIZE}"
        return self.raw[start:start + size]

    def capset_info(self) -> RespCapsetInfo:
        """The body of an OK_CAPSET_INFO response."""
        self.expect(Resp.OK_CAPSET_INFO)
        return decode(RespCapsetInfo, self.raw, CTRL_HDR_SIZE)
