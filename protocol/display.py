"""The vhost-user-gpu display socket (QEMU ``docs/interop/vhost-user-gpu.rst``).

The back-end sends requests over the socket QEMU passed with ``GPU_SET_SOCKET``;
QEMU sends the optional replies (flag ``REPLY``).  Header: ``u32 request; u32 flags;
u32 size`` (no version bits).  Both directions use :class:`MessageReader` for
framing, so the same code serves the back-end and the test front-end.
"""

from __future__ import annotations

import struct
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum, IntFlag
from typing import Final, NamedTuple

from protocol.errors import DisplayProtocolError
from protocol.virtio_gpu import CTRL_HDR_SIZE, MAX_SCANOUTS, CtrlHdr, DisplayOne
from protocol.virtio_gpu_codes import Resp
from protocol.wire import U32, U64, decode, encode, layout, wire

__all__ = [
    "CURSOR_DATA_SIZE",
    "CURSOR_SIZE",
    "DISPLAY_HEADER_SIZE",
    "DisplayFeature",
    "DisplayFlag",
    "DisplayMessage",
    "DisplayReq",
    "MessageReader",
    "VhostUserGpuCursorPos",
    "VhostUserGpuCursorUpdate",
    "VhostUserGpuEdidRequest",
    "VhostUserGpuScanout",
    "VhostUserGpuUpdate",
    "decode_display_info",
    "encode_display_info",
    "encode_message",
    "encode_update",
]


class DisplayReq(IntEnum):
    """``VhostUserGpuRequest``."""

    GET_PROTOCOL_FEATURES = 1
    SET_PROTOCOL_FEATURES = 2
    GET_DISPLAY_INFO = 3
    CURSOR_POS = 4
    CURSOR_POS_HIDE = 5
    CURSOR_UPDATE = 6
    SCANOUT = 7
    UPDATE = 8
    DMABUF_SCANOUT = 9
    DMABUF_UPDATE = 10
    GET_EDID = 11
    DMABUF_SCANOUT2 = 12


class DisplayFlag(IntFlag):
    """``VhostUserGpuHeader.flags``."""

    REPLY = 0x4


class DisplayFeature(IntFlag):
    """``VHOST_USER_GPU_PROTOCOL_F_*``."""

    EDID = 1 << 0
    DMABUF2 = 1 << 1


DISPLAY_HEADER_SIZE: Final = 12
CURSOR_SIZE: Final = 64
CURSOR_DATA_SIZE: Final = CURSOR_SIZE * CURSOR_SIZE * 4
_HEADER: Final = struct.Struct("<III")
_U64: Final = struct.Struct("<Q")


@wire("VhostUserGpuCursorPos")
class VhostUserGpuCursorPos(NamedTuple):
    """``struct { uint32_t scanout_id; uint32_t x; uint32_t y; }``"""

    scanout_id: U32
    x: U32
    y: U32


@wire("VhostUserGpuCursorUpdate (header)")
class VhostUserGpuCursorUpdate(NamedTuple):
    """``struct { VhostUserGpuCursorPos pos; uint32_t hot_x; uint32_t hot_y;
    uint32_t data[64 * 64]; }`` -- the header; 16384 bytes of a8r8g8b8 follow."""

    scanout_id: U32
    x: U32
    y: U32
    hot_x: U32
    hot_y: U32


@wire("VhostUserGpuScanout")
class VhostUserGpuScanout(NamedTuple):
    """``struct { uint32_t scanout_id; uint32_t width; uint32_t height; }``"""

    scanout_id: U32
    width: U32
    height: U32


@wire("VhostUserGpuUpdate (header)")
class VhostUserGpuUpdate(NamedTuple):
    """``struct { uint32_t scanout_id; uint32_t x; uint32_t y; uint32_t width;
    uint32_t height; uint8_t data[]; }`` -- ``width*height*4`` bytes of x8r8g8b8
    (B,G,R,X in memory), stride ``width*4``, follow."""

    scanout_id: U32
    x: U32
    y: U32
    width: U32
    height: U32


@wire("VhostUserGpuEdidRequest")
class VhostUserGpuEdidRequest(NamedTuple):
    """``struct { uint32_t scanout_id; }``"""

    scanout_id: U32


@wire("VhostUserGpuDMABUFScanout")
class VhostUserGpuDmabufScanout(NamedTuple):
    """``struct { uint32_t scanout_id; uint32_t x; uint32_t y; uint32_t width;
    uint32_t height; uint32_t fd_width; uint32_t fd_height; uint32_t fd_stride;
    uint32_t fd_flags; int fd_drm_fourcc; }`` (declared for decoding only; this
    back-end never sends DMABUF messages)"""

    scanout_id: U32
    x: U32
    y: U32
    width: U32
    height: U32
    fd_width: U32
    fd_height: U32
    fd_stride: U32
    fd_flags: U32
    fd_drm_fourcc: U32


@wire("VhostUserGpuDMABUFScanout2 (modifier)")
class DmabufModifier(NamedTuple):
    """``uint64_t modifier`` following the DMABUF_SCANOUT fields in DMABUF_SCANOUT2."""

    modifier: U64


UPDATE_HEADER_SIZE: Final = layout(VhostUserGpuUpdate).size
_DISPLAY_ONE_SIZE: Final = layout(DisplayOne).size
#: ``struct virtio_gpu_resp_display_info``: ctrl hdr (24) + 16 pmodes
DISPLAY_INFO_SIZE: Final = CTRL_HDR_SIZE + MAX_SCANOUTS * _DISPLAY_ONE_SIZE


_REPLY = int(DisplayFlag.REPLY)


@dataclass(frozen=True, slots=True)
class DisplayMessage:
    """One framed display-socket message (either direction)."""

    request: int
    flags: int
    payload: bytes
    fds: tuple[int, ...] = ()

    @property
    def is_reply(self) -> bool:
        """QEMU's replies carry the REPLY flag."""
        return bool(self.flags & _REPLY)  # an int: IntFlag arithmetic makes members

    def u64(self) -> int:
        """The payload as one u64 (protocol-feature messages)."""
        if len(self.payload) != 8:
            raise DisplayProtocolError(
                f"display message {self.request}: expected 8 bytes, got {len(self.payload)}")
        return int(_U64.unpack(self.payload)[0])


def encode_message(request: int, payload: bytes = b"", flags: int = 0) -> bytes:
    """Frame one display-socket message."""
    return _HEADER.pack(request, flags, len(payload)) + payload


def encode_update(scanout_id: int, x: int, y: int, width: int, height: int) -> bytes:
    """The header of an UPDATE message (header + update fields); pixels follow."""
    body = encode(VhostUserGpuUpdate(scanout_id, x, y, width, height))
    return _HEADER.pack(DisplayReq.UPDATE, 0, len(body) + width * height * 4) + body


def encode_display_info(modes: list[DisplayOne]) -> bytes:
    """``virtio_gpu_resp_display_info`` (408 bytes) with up to 16 pmodes."""
    if len(modes) > MAX_SCANOUTS:
        raise ValueError("at most 16 scanouts")
    hdr = encode(CtrlHdr(Resp.OK_DISPLAY_INFO))
    body = b"".join(encode(m) for m in modes)
    return hdr + body + bytes(DISPLAY_INFO_SIZE - len(hdr) - len(body))


def decode_display_info(payload: bytes) -> list[DisplayOne]:
    """The 16 pmodes of a ``virtio_gpu_resp_display_info``."""
    if len(payload) != DISPLAY_INFO_SIZE:
        raise DisplayProtocolError(
            f"display info reply is {len(payload)} bytes, expected {DISPLAY_INFO_SIZE}")
    return [decode(DisplayOne, payload, CTRL_HDR_SIZE + i * _DISPLAY_ONE_SIZE)
            for i in range(MAX_SCANOUTS)]


class MessageReader:
    """Frames display messages from a byte stream.

    :param max_payload: payloads above this are a protocol error (the front-end side
        must allow full-frame UPDATEs; the back-end side only small replies).
    """

    def __init__(self, max_payload: int) -> None:
        self._max = max_payload
        self._buf = bytearray()
        self._fds: list[int] = []

    def bytes_wanted(self) -> int:
        """Bytes the next read may take without crossing a message boundary."""
        if len(self._buf) < DISPLAY_HEADER_SIZE:
            return DISPLAY_HEADER_SIZE - len(self._buf)
        size = int(_HEADER.unpack_from(self._buf)[2])
        return DISPLAY_HEADER_SIZE + size - len(self._buf)

    def receive(self, data: bytes, fds: tuple[int, ...] = ()) -> Iterator[DisplayMessage]:
        """Feed bytes; yield complete messages.

        :raise DisplayProtocolError: a payload larger than ``max_payload``.
        """
        self._buf += data
        self._fds.extend(fds)
        while len(self._buf) >= DISPLAY_HEADER_SIZE:
            request, flags, size = _HEADER.unpack_from(self._buf)
            if size > self._max:
                raise DisplayProtocolError(
                    f"display message {request} of {size} bytes exceeds {self._max}")
            end = DISPLAY_HEADER_SIZE + size
            if len(self._buf) < end:
                return
            payload = bytes(self._buf[DISPLAY_HEADER_SIZE:end])
            del self._buf[:end]
            fds_now, self._fds = tuple(self._fds), []
            yield DisplayMessage(request, flags, payload, fds_now)
