"""Request codes, flags and feature bits are the numbers of the upstream documents.

The test front-end and display peer use the same enums as the back-end, so a wrong
number would go unnoticed by every conversation test; these tables are copied from
QEMU's ``docs/interop/vhost-user.rst`` and ``docs/interop/vhost-user-gpu.rst``.
"""

from __future__ import annotations

from enum import IntEnum, IntFlag

import pytest

from protocol import display, vhost_user

#: ``VhostUserRequest`` (vhost-user.rst, "Front-end message types")
FRONTEND_REQUESTS = ["GET_FEATURES", "SET_FEATURES", "SET_OWNER", "RESET_OWNER", "SET_MEM_TABLE",
    "SET_LOG_BASE", "SET_LOG_FD", "SET_VRING_NUM", "SET_VRING_ADDR", "SET_VRING_BASE",
    "GET_VRING_BASE", "SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ERR", "GET_PROTOCOL_FEATURES",
    "SET_PROTOCOL_FEATURES", "GET_QUEUE_NUM", "SET_VRING_ENABLE", "SEND_RARP", "NET_SET_MTU",
    "SET_BACKEND_REQ_FD", "IOTLB_MSG", "SET_VRING_ENDIAN", "GET_CONFIG", "SET_CONFIG",
    "CREATE_CRYPTO_SESSION", "CLOSE_CRYPTO_SESSION", "POSTCOPY_ADVISE", "POSTCOPY_LISTEN",
    "POSTCOPY_END", "GET_INFLIGHT_FD", "SET_INFLIGHT_FD", "GPU_SET_SOCKET", "RESET_DEVICE",
    "VRING_KICK", "GET_MAX_MEM_SLOTS", "ADD_MEM_REG", "REM_MEM_REG", "SET_STATUS", "GET_STATUS",
    "GET_SHARED_OBJECT", "SET_DEVICE_STATE_FD", "CHECK_DEVICE_STATE"]
#: ``VHOST_USER_PROTOCOL_F_*``, bit 0 upwards
PROTOCOL_FEATURES = ["MQ", "LOG_SHMFD", "RARP", "REPLY_ACK", "NET_MTU", "BACKEND_REQ",
    "CROSS_ENDIAN", "CRYPTO_SESSION", "PAGEFAULT", "CONFIG", "BACKEND_SEND_FD", "HOST_NOTIFIER",
    "INFLIGHT_SHMFD", "RESET_DEVICE", "INBAND_NOTIFICATIONS", "CONFIGURE_MEM_SLOTS", "STATUS"]
#: ``VhostUserGpuRequest`` (vhost-user-gpu.rst)
DISPLAY_REQUESTS = ["GET_PROTOCOL_FEATURES", "SET_PROTOCOL_FEATURES", "GET_DISPLAY_INFO",
    "CURSOR_POS", "CURSOR_POS_HIDE", "CURSOR_UPDATE", "SCANOUT", "UPDATE", "DMABUF_SCANOUT",
    "DMABUF_UPDATE", "GET_EDID", "DMABUF_SCANOUT2"]
#: ``VHOST_USER_GPU_PROTOCOL_F_*``, bit 0 upwards
DISPLAY_FEATURES = ["EDID", "DMABUF2"]


@pytest.mark.parametrize(("enum", "names"), [
    (vhost_user.FrontendReq, FRONTEND_REQUESTS),
    (display.DisplayReq, DISPLAY_REQUESTS),
], ids=["vhost-user", "display"])
def test_request_codes_count_from_one_in_document_order(
        enum: type[IntEnum], names: list[str]) -> None:
    assert {member.name: int(member) for member in enum} == {
        name: code for code, name in enumerate(names, start=1)}


@pytest.mark.parametrize(("enum", "names"), [
    (vhost_user.ProtocolFeature, PROTOCOL_FEATURES),
    (display.DisplayFeature, DISPLAY_FEATURES),
], ids=["vhost-user", "display"])
def test_feature_bits_count_from_bit_zero_in_document_order(
        enum: type[IntFlag], names: list[str]) -> None:
    assert {member.name: int(member) for member in enum} == {
        name: 1 << bit for bit, name in enumerate(names)}


def test_header_flags_and_vring_file_bits() -> None:
    """Version 1 in bits 0-1, REPLY bit 2, NEED_REPLY bit 3 (the display socket has no
    version and shares REPLY); a vring-file u64 has the queue in bits 0-7, NOFD bit 8."""
    flags = vhost_user.HeaderFlag
    assert (flags.VERSION, flags.REPLY, flags.NEED_REPLY) == (0x1, 0x4, 0x8)
    assert vhost_user.REPLY_FLAGS == 0x5
    assert int(display.DisplayFlag.REPLY) == 0x4
    assert (vhost_user.VRING_FILE_INDEX_MASK, vhost_user.VRING_FILE_NOFD) == (0xFF, 0x100)
