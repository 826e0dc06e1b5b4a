"""vhost-user wire format (QEMU ``docs/interop/vhost-user.rst``): codes and structs.

All integers are host (little-endian) order.  Every message starts with a 12-byte
header; replies carry ``flags == VERSION | REPLY`` exactly.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag
from typing import Final, NamedTuple

from protocol.wire import U32, U64, wire

__all__ = [
    "HEADER_SIZE",
    "REPLY_FLAGS",
    "ConfigHeader",
    "FrontendReq",
    "Header",
    "HeaderFlag",
    "MemRegion",
    "MemTableHeader",
    "ProtocolFeature",
    "SingleMemRegion",
    "VringAddr",
    "VringState",
]


class FrontendReq(IntEnum):
    """Front-end (QEMU) to back-end requests (``VhostUserRequest``)."""

    GET_FEATURES = 1
    SET_FEATURES = 2
    SET_OWNER = 3
    RESET_OWNER = 4
    SET_MEM_TABLE = 5
    SET_LOG_BASE = 6
    SET_LOG_FD = 7
    SET_VRING_NUM = 8
    SET_VRING_ADDR = 9
    SET_VRING_BASE = 10
    GET_VRING_BASE = 11
    SET_VRING_KICK = 12
    SET_VRING_CALL = 13
    SET_VRING_ERR = 14
    GET_PROTOCOL_FEATURES = 15
    SET_PROTOCOL_FEATURES = 16
    GET_QUEUE_NUM = 17
    SET_VRING_ENABLE = 18
    SEND_RARP = 19
    NET_SET_MTU = 20
    SET_BACKEND_REQ_FD = 21  # SET_SLAVE_REQ_FD before QEMU 8
    IOTLB_MSG = 22
    SET_VRING_ENDIAN = 23
    GET_CONFIG = 24
    SET_CONFIG = 25
    CREATE_CRYPTO_SESSION = 26
    CLOSE_CRYPTO_SESSION = 27
    POSTCOPY_ADVISE = 28
    POSTCOPY_LISTEN = 29
    POSTCOPY_END = 30
    GET_INFLIGHT_FD = 31
    SET_INFLIGHT_FD = 32
    GPU_SET_SOCKET = 33
    RESET_DEVICE = 34
    VRING_KICK = 35
    GET_MAX_MEM_SLOTS = 36
    ADD_MEM_REG = 37
    REM_MEM_REG = 38
    SET_STATUS = 39
    GET_STATUS = 40
    GET_SHARED_OBJECT = 41
    SET_DEVICE_STATE_FD = 42
    CHECK_DEVICE_STATE = 43


class ProtocolFeature(IntFlag):
    """``VHOST_USER_PROTOCOL_F_*`` bits."""

    MQ = 1 << 0
    LOG_SHMFD = 1 << 1
    RARP = 1 << 2
    REPLY_ACK = 1 << 3
    NET_MTU = 1 << 4
    BACKEND_REQ = 1 << 5
    CROSS_ENDIAN = 1 << 6
    CRYPTO_SESSION = 1 << 7
    PAGEFAULT = 1 << 8
    CONFIG = 1 << 9
    BACKEND_SEND_FD = 1 << 10
    HOST_NOTIFIER = 1 << 11
    INFLIGHT_SHMFD = 1 << 12
    RESET_DEVICE = 1 << 13
    INBAND_NOTIFICATIONS = 1 << 14
    CONFIGURE_MEM_SLOTS = 1 << 15
    STATUS = 1 << 16


class HeaderFlag(IntFlag):
    """``VhostUserHeader.flags``: bits 0-1 version, 2 reply, 3 need-reply."""

    VERSION = 0x1
    REPLY = 0x4
    NEED_REPLY = 0x8


HEADER_SIZE: Final = 12
REPLY_FLAGS: Final = HeaderFlag.VERSION | HeaderFlag.REPLY
VRING_FILE_INDEX_MASK: Final = 0xFF
VRING_FILE_NOFD: Final = 0x100


@wire("VhostUserHeader")
class Header(NamedTuple):
    """``struct { uint32_t request; uint32_t flags; uint32_t size; }`` (12 bytes)."""

    request: U32
    flags: U32
    size: U32


@wire("struct vhost_vring_state")
class VringState(NamedTuple):
    """``struct vhost_vring_state { unsigned int index; unsigned int num; };``
    (``index`` is ``queue`` here: a NamedTuple field may not shadow ``tuple.index``)"""

    queue: U32
    num: U32


@wire("struct vhost_vring_addr")
class VringAddr(NamedTuple):
    """``struct vhost_vring_addr { unsigned int index; unsigned int flags;
    __u64 desc_user_addr; __u64 used_user_addr; __u64 avail_user_addr;
    __u64 log_guest_addr; };`` -- note the order desc, used, avail; ``index`` is
    ``queue`` here."""

    queue: U32
    flags: U32
    desc_user_addr: U64
    used_user_addr: U64
    avail_user_addr: U64
    log_guest_addr: U64


@wire("VhostUserMemoryRegion")
class MemRegion(NamedTuple):
    """``struct { uint64_t guest_phys_addr; uint64_t memory_size;
    uint64_t userspace_addr; uint64_t mmap_offset; }``"""

    guest_phys_addr: U64
    memory_size: U64
    userspace_addr: U64
    mmap_offset: U64


@wire("VhostUserMemory (header)")
class MemTableHeader(NamedTuple):
    """``struct { uint32_t nregions; uint32_t padding;
    VhostUserMemoryRegion regions[VHOST_MEMORY_BASELINE_NREGIONS]; }`` -- the header;
    ``nregions`` regions follow."""

    nregions: U32
    padding: U32 = 0


@wire("VhostUserMemRegMsg")
class SingleMemRegion(NamedTuple):
    """``struct { uint64_t padding; VhostUserMemoryRegion region; }`` (ADD/REM_MEM_REG)."""

    padding: U64
    guest_phys_addr: U64
    memory_size: U64
    userspace_addr: U64
    mmap_offset: U64

    @property
    def region(self) -> MemRegion:
        """The region without the padding."""
        return MemRegion(self.guest_phys_addr, self.memory_size, self.userspace_addr,
                         self.mmap_offset)


@wire("VhostUserConfig (header)")
class ConfigHeader(NamedTuple):
    """``struct { uint32_t offset; uint32_t size; uint32_t flags;
    uint8_t region[VHOST_USER_MAX_CONFIG_SIZE]; }`` -- the header; ``size`` bytes follow."""

    offset: U32
    size: U32
    flags: U32
