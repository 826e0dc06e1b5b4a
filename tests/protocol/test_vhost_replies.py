"""``BackendConnection.reply``/``ack``: reply framing and when a REPLY_ACK u64 is owed.

vhost-user.rst: with REPLY_ACK negotiated, a request carrying NEED_REPLY gets a u64
ack (0 = success) -- unless the request has a reply of its own (every ``GET_*``,
SET_DEVICE_STATE_FD and CHECK_DEVICE_STATE), which then is the only answer.
"""

from __future__ import annotations

import struct

import pytest

from protocol.vhost_user import FrontendReq
from protocol.vhost_user_connection import BackendConnection, Request

HEADER = struct.Struct("<III")
NEED_REPLY = 0x1 | 0x8
WITH_BODY = [r for r in FrontendReq if r.name.startswith("GET_")] + [
    FrontendReq.SET_DEVICE_STATE_FD, FrontendReq.CHECK_DEVICE_STATE]
WITHOUT_BODY = [r for r in FrontendReq if r not in WITH_BODY]


@pytest.mark.parametrize("code", WITHOUT_BODY, ids=lambda r: r.name)
@pytest.mark.parametrize(("ok", "value"), [(True, 0), (False, 1)], ids=["ok", "failed"])
def test_need_reply_is_acked_with_a_u64_status(code: FrontendReq, ok: bool, value: int
                                               ) -> None:
    ack = BackendConnection.ack(Request(code, NEED_REPLY, b"", ()), ok, reply_ack=True)
    assert ack == HEADER.pack(code, 0x5, 8) + struct.pack("<Q", value)


@pytest.mark.parametrize("code", WITH_BODY, ids=lambda r: r.name)
def test_requests_with_a_reply_body_get_no_extra_ack(code: FrontendReq) -> None:
    assert BackendConnection.ack(Request(code, NEED_REPLY, b"", ()), True, True) is None


@pytest.mark.parametrize(("flags", "reply_ack"), [(0x1, True), (NEED_REPLY, False)],
                         ids=["no NEED_REPLY", "REPLY_ACK not negotiated"])
def test_no_ack_without_need_reply_and_reply_ack(flags: int, reply_ack: bool) -> None:
    request = Request(FrontendReq.SET_VRING_NUM, flags, b"", ())
    assert BackendConnection.ack(request, True, reply_ack) is None
    assert BackendConnection.ack(request, False, reply_ack) is None


def test_reply_u64_carries_all_64_bits() -> None:
    request = Request(FrontendReq.GET_FEATURES, 0x1, b"", ())
    assert BackendConnection.reply_u64(request, (1 << 64) - 2) == (
        HEADER.pack(FrontendReq.GET_FEATURES, 0x5, 8) + struct.pack("<Q", (1 << 64) - 2))
