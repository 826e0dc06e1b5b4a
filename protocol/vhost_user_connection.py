"""Sans-IO vhost-user back-end connection: framing, payload decoding, replies.

The I/O layer reads at most :meth:`BackendConnection.bytes_wanted` bytes at a time
(so one read never crosses a message boundary and the SCM_RIGHTS fds that arrive
with a message's first byte are attributed to that message), passes the bytes and
fds to :meth:`BackendConnection.receive` and gets complete :class:`Request` objects
back.  Replies are built as bytes by :meth:`reply`/:meth:`ack`.  Nothing here
touches a socket or an fd; fds are only numbers that the I/O layer owns.
"""

from __future__ import annotations

import struct
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Final

from protocol.errors import FrontendProtocolError
from protocol.limits import DEFAULT_LIMITS, Limits
from protocol.vhost_user import (
    HEADER_SIZE,
    REPLY_FLAGS,
    VRING_FILE_INDEX_MASK,
    VRING_FILE_NOFD,
    ConfigHeader,
    FrontendReq,
    Header,
    HeaderFlag,
    MemRegion,
    MemTableHeader,
    SingleMemRegion,
    VringAddr,
    VringState,
)
from protocol.wire import decode, encode, layout

__all__ = [
    "REQUESTS_WITH_REPLY",
    "BackendConnection",
    "ConfigPayload",
    "Request",
    "VringFile",
    "decode_config",
    "decode_mem_table",
    "decode_single_region",
    "decode_u64",
    "decode_vring_addr",
    "decode_vring_file",
    "decode_vring_state",
    "encode_config",
    "request_name",
]

#: Requests whose reply carries a body; NEED_REPLY on them means "the normal reply".
REQUESTS_WITH_REPLY: Final = frozenset({
    FrontendReq.GET_FEATURES, FrontendReq.GET_PROTOCOL_FEATURES, FrontendReq.GET_QUEUE_NUM,
    FrontendReq.GET_VRING_BASE, FrontendReq.GET_CONFIG, FrontendReq.GET_MAX_MEM_SLOTS,
    FrontendReq.GET_INFLIGHT_FD, FrontendReq.GET_STATUS, FrontendReq.GET_SHARED_OBJECT,
    FrontendReq.SET_DEVICE_STATE_FD, FrontendReq.CHECK_DEVICE_STATE,
})

_U64: Final = struct.Struct("<Q")
_HEADER = layout(Header).struct
_REGION_SIZE: Final = layout(MemRegion).size
_TABLE_HEADER_SIZE: Final = layout(MemTableHeader).size
_CONFIG_HEADER_SIZE: Final = layout(ConfigHeader).size


def request_name(code: int) -> str:
    """``GET_FEATURES`` for 1, ``UNKNOWN(99)`` for codes we do not know."""
    try:
        return FrontendReq(code).name
    except ValueError:
        return f"UNKNOWN({code})"


@dataclass(frozen=True, slots=True)
class Request:
    """One complete front-end request."""

    code: int
    flags: int
    payload: bytes
    fds: tuple[int, ...]

    @property
    def name(self) -> str:
        """Human-readable request name."""
        return request_name(self.code)

    @property
    def need_reply(self) -> bool:
        """The front-end set NEED_REPLY (only meaningful with REPLY_ACK)."""
        return bool(self.flags & HeaderFlag.NEED_REPLY)


class BackendConnection:
    """Frames front-end requests out of a byte stream (see module docstring)."""

    def __init__(self, limits: Limits = DEFAULT_LIMITS) -> None:
        self._limits = limits
        self._buf = bytearray()
        self._header: Header | None = None
        self._fds: list[int] = []

    def bytes_wanted(self) -> int:
        """How many bytes the next read may take without crossing a message boundary."""
        if self._header is None:
            return HEADER_SIZE - len(self._buf)
        return self._header.size - len(self._buf)

    def pending_fds(self) -> tuple[int, ...]:
        """fds received for an incomplete message (the I/O layer closes them on EOF)."""
        return tuple(self._fds)

    def receive(self, data: bytes, fds: Sequence[int] = ()) -> list[Request]:
        """Feed bytes (and the fds received with them); return completed requests.

        :raise FrontendProtocolError: bad version bits, oversized payload, too many fds.
            The fds of the offending message are included in the exception's
            ``fds`` attribute so the caller can close them.
        """
        self._fds.extend(fds)
        if len(self._fds) > self._limits.max_fds_per_message:
            held, self._fds = tuple(self._fds), []
            raise FrontendProtocolError(
                f"{len(held)} fds with one message (limit "
                f"{self._limits.max_fds_per_message})", held)
        out: list[Request] = []
        view = memoryview(data)
        while True:
            if self._header is None:
                take = min(len(view), HEADER_SIZE - len(self._buf))
                self._buf += view[:take]
                view = view[take:]
                if len(self._buf) < HEADER_SIZE:
                    break
                header = Header._make(_HEADER.unpack(self._buf))
                self._buf.clear()
                self._check_header(header)
                self._header = header
            header = self._header
            take = min(len(view), header.size - len(self._buf))
            self._buf += view[:take]
            view = view[take:]
            if len(self._buf) < header.size:
                break
            out.append(Request(header.request, header.flags, bytes(self._buf), tuple(self._fds)))
            self._buf.clear()
            self._fds.clear()
            self._header = None
            if not view:
                break
        return out

    def _check_header(self, header: Header) -> None:
        problem = None
        if header.flags & 0x3 != HeaderFlag.VERSION:
            problem = f"bad version bits in flags {header.flags:#x}"
        elif header.flags & HeaderFlag.REPLY:
            problem = "front-end sent a message with the REPLY flag"
        elif header.size > self._limits.max_vhost_payload:
            problem = f"payload of {header.size} bytes exceeds {self._limits.max_vhost_payload}"
        elif len(self._fds) > self._limits.max_fds_per_message:
            problem = f"{len(self._fds)} fds with one message"
        if problem:
            fds = tuple(self._fds)
            self._fds.clear()
            raise FrontendProtocolError(f"{request_name(header.request)}: {problem}", fds)

    @staticmethod
    def reply(request: Request, payload: bytes) -> bytes:
        """A reply carrying ``payload`` to ``request``."""
        return _HEADER.pack(request.code, REPLY_FLAGS, len(payload)) + payload

    @staticmethod
    def reply_u64(request: Request, value: int) -> bytes:
        """A reply carrying one u64."""
        return BackendConnection.reply(request, _U64.pack(value & 0xFFFF_FFFF_FFFF_FFFF))

    @staticmethod
    def ack(request: Request, ok: bool, reply_ack: bool) -> bytes | None:
        """The REPLY_ACK answer (u64 0 = success) if one is owed, else ``None``.

        Requests that already have a reply body never get an extra ack.
        """
        if not (reply_ack and request.need_reply) or request.code in REQUESTS_WITH_REPLY:
            return None
        return BackendConnection.reply_u64(request, 0 if ok else 1)


# --- payload decoders -------------------------------------------------------------


def _need(req: Request, size: int, *, exact: bool = True) -> None:
    if (len(req.payload) != size) if exact else (len(req.payload) < size):
        raise FrontendProtocolError(
            f"{req.name}: payload is {len(req.payload)} bytes, expected {size}")


def decode_u64(req: Request) -> int:
    """The u64 payload of SET_FEATURES and friends."""
    _need(req, 8)
    return int(_U64.unpack(req.payload)[0])


def decode_vring_state(req: Request) -> VringState:
    """``struct vhost_vring_state`` payload."""
    _need(req, layout(VringState).size)
    return decode(VringState, req.payload)


def decode_vring_addr(req: Request) -> VringAddr:
    """``struct vhost_vring_addr`` payload."""
    _need(req, layout(VringAddr).size)
    return decode(VringAddr, req.payload)


@dataclass(frozen=True, slots=True)
class VringFile:
    """SET_VRING_KICK/CALL/ERR payload: queue index and the fd (``None`` with NOFD)."""

    index: int
    fd: int | None


def decode_vring_file(req: Request) -> VringFile:
    """Decode the u64 of SET_VRING_KICK/CALL/ERR together with its fd."""
    value = decode_u64(req)
    index = value & VRING_FILE_INDEX_MASK
    if value & VRING_FILE_NOFD:
        if req.fds:
            raise FrontendProtocolError(f"{req.name}: NOFD set but an fd was sent")
        return VringFile(index, None)
    if len(req.fds) != 1:
        raise FrontendProtocolError(f"{req.name}: expected one fd, got {len(req.fds)}")
    return VringFile(index, req.fds[0])


def decode_mem_table(req: Request) -> list[MemRegion]:
    """SET_MEM_TABLE: the regions, one fd each in the same order."""
    _need(req, _TABLE_HEADER_SIZE, exact=False)
    head = decode(MemTableHeader, req.payload)
    if head.nregions == 0 or head.nregions > 8:
        raise FrontendProtocolError(f"SET_MEM_TABLE: {head.nregions} regions (1..8 allowed)")
    _need(req, _TABLE_HEADER_SIZE + head.nregions * _REGION_SIZE)
    if len(req.fds) != head.nregions:
        raise FrontendProtocolError(
            f"SET_MEM_TABLE: {head.nregions} regions but {len(req.fds)} fds")
    return [decode(MemRegion, req.payload, _TABLE_HEADER_SIZE + i * _REGION_SIZE)
            for i in range(head.nregions)]


def decode_single_region(req: Request) -> MemRegion:
    """ADD_MEM_REG / REM_MEM_REG payload."""
    _need(req, layout(SingleMemRegion).size)
    return decode(SingleMemRegion, req.payload).region


@dataclass(frozen=True, slots=True)
class ConfigPayload:
    """GET/SET_CONFIG payload."""

    offset: int
    size: int
    flags: int
    data: bytes


def decode_config(req: Request) -> ConfigPayload:
    """``VhostUserConfig``: header plus exactly ``size`` bytes."""
    _need(req, _CONFIG_HEADER_SIZE, exact=False)
    head = decode(ConfigHeader, req.payload)
    _need(req, _CONFIG_HEADER_SIZE + head.size)
    return ConfigPayload(head.offset, head.size, head.flags, req.payload[_CONFIG_HEADER_SIZE:])


def encode_config(offset: int, flags: int, data: bytes) -> bytes:
    """A ``VhostUserConfig`` payload."""
    return encode(ConfigHeader(offset, len(data), flags)) + data
