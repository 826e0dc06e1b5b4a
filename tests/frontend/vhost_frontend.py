"""The vhost-user front-end (QEMU's ``hw/virtio/vhost-user.c``) over a real unix socket.

Every request is sent the way the chosen QEMU version sends it (NEED_REPLY policy,
one ``sendmsg`` with the fds as SCM_RIGHTS), and every reply is checked exactly as
QEMU checks it: ``flags == 0x5``, same request code, the expected payload size, no
fds, and a zero u64 in REPLY_ACK acks.  Anything else raises :class:`ReplyError`.
"""

from __future__ import annotations

import array
import select
import socket
import struct
from collections.abc import Sequence
from dataclasses import dataclass

from protocol.vhost_user import (
    HEADER_SIZE,
    REPLY_FLAGS,
    VRING_FILE_NOFD,
    FrontendReq,
    HeaderFlag,
    MemTableHeader,
    ProtocolFeature,
    SingleMemRegion,
    VringAddr,
    VringState,
)
from protocol.vhost_user_connection import encode_config, request_name
from protocol.wire import encode
from tests.frontend.flavour import QemuFlavour
from tests.frontend.guest_ram import RamRegion

__all__ = ["Message", "ReplyError", "VhostUserFrontend"]

_HEADER = struct.Struct("<III")
_U64 = struct.Struct("<Q")
#: a GPU config read: offset 0, 16 bytes, flags 0 (VHOST_SET_CONFIG_TYPE_FRONTEND)
CONFIG_LEN = 16
CONFIG_REPLY_SIZE = 12 + CONFIG_LEN

#: requests carrying NEED_REPLY whenever REPLY_ACK is negotiated (both versions)
_ACKED_ALWAYS = frozenset({FrontendReq.SET_MEM_TABLE, FrontendReq.ADD_MEM_REG,
                           FrontendReq.REM_MEM_REG, FrontendReq.SET_BACKEND_REQ_FD,
                           FrontendReq.SET_CONFIG})
#: ... and these only from QEMU 8.x/10.x on
_ACKED_VRING = frozenset({FrontendReq.SET_VRING_KICK, FrontendReq.SET_VRING_CALL,
                          FrontendReq.SET_VRING_ERR, FrontendReq.SET_VRING_ENABLE})


class ReplyError(AssertionError):
    """The back-end's reply would make QEMU fail the operation."""


@dataclass(frozen=True, slots=True)
class Message:
    """One message on the vhost-user socket, as logged for trace comparison."""

    direction: str  # "Q->B" or "B->Q"
    request: int
    flags: int
    size: int
    fds: int
    payload: bytes

    @property
    def name(self) -> str:
        """Request name."""
        return request_name(self.request)


class VhostUserFrontend:
    """One vhost-user connection, front-end side.

    :param need_reply_everywhere: set NEED_REPLY on every request without a reply body
        (a stricter front-end than QEMU, to check the back-end honours it generically).
    """

    def __init__(self, sock: socket.socket, flavour: QemuFlavour, *,
                 timeout: float = 5.0, need_reply_everywhere: bool = False) -> None:
        self.sock = sock
        self.flavour = flavour
        self.timeout = timeout
        self.need_reply_everywhere = need_reply_everywhere
        self.protocol_features = 0
        self.log: list[Message] = []

    # --- transport -------------------------------------------------------------------

    @property
    def reply_ack(self) -> bool:
        """REPLY_ACK was negotiated."""
        return bool(self.protocol_features & ProtocolFeature.REPLY_ACK)

    def _wants_ack(self, code: int) -> bool:
        if not self.reply_ack:
            return False
        if self.need_reply_everywhere or code in _ACKED_ALWAYS:
            return True
        return self.flavour.need_reply_on_vring and code in _ACKED_VRING

    def send(self, code: int, payload: bytes = b"", fds: Sequence[int] = (), *,
             flags: int | None = None) -> None:
        """Send one request verbatim (``flags`` defaults to VERSION)."""
        flags = int(HeaderFlag.VERSION) if flags is None else flags
        data = _HEADER.pack(code, flags, len(payload)) + payload
        anc = [(socket.SOL_SOCKET, socket.SCM_RIGHTS, array.array("i", fds).tobytes())] \
            if fds else []
        sent = self.sock.sendmsg([data], anc)
        if sent < len(data):
            self.sock.sendall(data[sent:])
        self.log.append(Message("Q->B", code, flags, len(payload), len(fds), payload))

    def _recv_exact(self, n: int) -> bytes:
        buf = bytearray()
        while len(buf) < n:
            if not select.select([self.sock], [], [], self.timeout)[0]:
                raise ReplyError(f"no reply within {self.timeout}s")
            chunk = self.sock.recv(n - len(buf))
            if not chunk:
                raise ReplyError("back-end closed the vhost-user socket")
            buf += chunk
        return bytes(buf)

    def read_reply(self, code: int, size: int | None) -> bytes:
        """Read one reply to ``code`` and check it like QEMU's ``vhost_user_read``."""
        if not select.select([self.sock], [], [], self.timeout)[0]:
            raise ReplyError(f"{request_name(code)}: no reply within {self.timeout}s")
        data, anc, _, _ = self.sock.recvmsg(HEADER_SIZE, socket.CMSG_SPACE(8 * 4))
        if not data:
            raise ReplyError(f"{request_name(code)}: back-end closed the socket")
        data += self._recv_exact(HEADER_SIZE - len(data))
        request, flags, length = _HEADER.unpack(data)
        payload = self._recv_exact(length)
        self.log.append(Message("B->Q", request, flags, length, len(anc), payload))
        if anc:
            raise ReplyError(f"{request_name(code)}: reply carries ancillary data (fds)")
        if flags != REPLY_FLAGS:
            raise ReplyError(f"{request_name(code)}: reply flags {flags:#x}, QEMU requires "
                             f"{int(REPLY_FLAGS):#x}")
        if request != code:
            raise ReplyError(f"Received unexpected msg type. Expected {code} received "
                             f"{request}")
        if size is not None and length != size:
            raise ReplyError(f"{request_name(code)}: Received bad msg size {length}, "
                             f"expected {size}")
        return payload

    def request(self, code: int, payload: bytes = b"", fds: Sequence[int] = (), *,
                need_reply: bool | None = None) -> int | None:
        """Send a request without a reply body; read and check its ack if one is due.

        Returns the ack value (always 0: non-zero raises), or ``None`` without ack.
        """
        ack = self._wants_ack(code) if need_reply is None else need_reply
        flags = int(HeaderFlag.VERSION | (HeaderFlag.NEED_REPLY if ack else 0))
        self.send(code, payload, fds, flags=flags)
        if not ack:
            return None
        value = int(_U64.unpack(self.read_reply(code, 8))[0])
        if value != 0:
            raise ReplyError(f"{request_name(code)}: back-end acked failure {value:#x}")
        return value

    def call(self, code: int, payload: bytes = b"", size: int | None = 8, *,
             flags: int | None = None) -> bytes:
        """Send a request that has a reply body and return the checked body."""
        self.send(code, payload, flags=flags)
        return self.read_reply(code, size)

    def pending(self, timeout: float = 0.0) -> bool:
        """Whether the back-end sent something nobody asked for (or closed the socket)."""
        return bool(select.select([self.sock], [], [], timeout)[0])

    # --- typed requests ----------------------------------------------------------------

    def get_u64(self, code: int) -> int:
        """GET_FEATURES, GET_PROTOCOL_FEATURES, GET_QUEUE_NUM, GET_MAX_MEM_SLOTS."""
        return int(_U64.unpack(self.call(code))[0])

    def set_u64(self, code: int, value: int) -> int | None:
        """SET_FEATURES, SET_PROTOCOL_FEATURES and other u64 setters."""
        return self.request(code, _U64.pack(value))

    def set_vring_file(self, code: int, index: int, fd: int | None) -> int | None:
        """SET_VRING_KICK / CALL / ERR (``fd=None`` sends NOFD)."""
        value = index | (VRING_FILE_NOFD if fd is None else 0)
        return self.request(code, _U64.pack(value), () if fd is None else (fd,))

    def set_vring_state(self, code: int, index: int, num: int) -> int | None:
        """SET_VRING_NUM / SET_VRING_BASE / SET_VRING_ENABLE."""
        ack = self.request(code, encode(VringState(index, num)))
        if (code == FrontendReq.SET_VRING_ENABLE and self.flavour.sync_after_enable
                and not self.reply_ack):
            self.get_u64(FrontendReq.GET_FEATURES)  # vhost_user_write_sync's barrier
        return ack

    def set_vring_addr(self, index: int, desc: int, used: int, avail: int, log: int) -> None:
        """SET_VRING_ADDR with QEMU-virtual ring addresses (desc, used, avail order)."""
        self.request(FrontendReq.SET_VRING_ADDR,
                     encode(VringAddr(index, 0, desc, used, avail, log)))

    def get_vring_base(self, index: int) -> int:
        """GET_VRING_BASE: stops the ring, returns its next avail index."""
        payload = self.call(FrontendReq.GET_VRING_BASE, encode(VringState(index, 0)), 8)
        got_index, num = struct.unpack("<II", payload)
        if got_index != index:
            raise ReplyError(f"GET_VRING_BASE({index}) answered for ring {got_index}")
        return int(num)

    def add_mem_reg(self, region: RamRegion, fd: int) -> None:
        """ADD_MEM_REG (CONFIGURE_MEM_SLOTS)."""
        r = region.to_wire()
        self.request(FrontendReq.ADD_MEM_REG, encode(SingleMemRegion(0, *r)), (fd,))

    def rem_mem_reg(self, region: RamRegion) -> None:
        """REM_MEM_REG (no fd, like QEMU >= 8)."""
        r = region.to_wire()
        self.request(FrontendReq.REM_MEM_REG, encode(SingleMemRegion(0, *r)))

    def set_mem_table(self, regions: Sequence[RamRegion], fd: int) -> None:
        """SET_MEM_TABLE with every region (one fd per region, all the same memfd)."""
        payload = encode(MemTableHeader(len(regions))) + b"".join(
            encode(r.to_wire()) for r in regions)
        self.request(FrontendReq.SET_MEM_TABLE, payload, [fd] * len(regions))

    def get_config(self) -> bytes:
        """GET_CONFIG as a guest config read does; returns the 16 config bytes."""
        payload = self.call(FrontendReq.GET_CONFIG, encode_config(0, 0, bytes(CONFIG_LEN)),
                            CONFIG_REPLY_SIZE)
        offset, size, _flags = struct.unpack_from("<III", payload)
        if (offset, size) != (0, CONFIG_LEN):
            raise ReplyError(f"GET_CONFIG reply for offset {offset} size {size}")
        return payload[12:]

    def set_config(self, data: bytes) -> None:
        """SET_CONFIG from a guest config write (``events_clear``)."""
        self.request(FrontendReq.SET_CONFIG, encode_config(0, 0, data))

    def gpu_set_socket(self, fd: int) -> None:
        """VHOST_USER_GPU_SET_SOCKET: flags 0x1, size 0, one fd; QEMU never sets
        NEED_REPLY on it (only ``need_reply_everywhere`` does)."""
        self.request(FrontendReq.GPU_SET_SOCKET, b"", (fd,),
                     need_reply=self.need_reply_everywhere and self.reply_ack)

    def close(self) -> None:
        """QEMU goes away: close the socket without a goodbye."""
        self.sock.close()
