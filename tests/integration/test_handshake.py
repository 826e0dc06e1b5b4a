"""vhost-user handshake in both QEMU flavours, replies checked byte by byte."""

from __future__ import annotations

import struct

import numpy as np
import pytest

from protocol.vhost_user import FrontendReq, HeaderFlag, ProtocolFeature
from protocol.vhost_user_connection import encode_config
from protocol.virtio_gpu import GpuConfig
from protocol.virtio_gpu_codes import Feature, Resp
from protocol.wire import encode
from tests.frontend.flavour import QEMU_7_2, QemuFlavour
from tests.frontend.pixels import random_pixels
from tests.frontend.vhost_frontend import Message
from tests.integration.conftest import FLAVOUR_NAMES, BackendSpec, SessionFactory

REQUIRED_FEATURES = (Feature.VERSION_1 | Feature.PROTOCOL_FEATURES | Feature.RING_INDIRECT_DESC
                     | Feature.RING_EVENT_IDX)
REQUIRED_PROTOCOL = (ProtocolFeature.REPLY_ACK | ProtocolFeature.CONFIG | ProtocolFeature.MQ
                     | ProtocolFeature.CONFIGURE_MEM_SLOTS)


def reply_bytes(m: Message) -> bytes:
    """A logged reply as it was on the wire."""
    return struct.pack("<III", m.request, m.flags, m.size) + m.payload


def replies(log: list[Message], request: int) -> list[bytes]:
    """Every reply to ``request`` in a front-end log, as wire bytes."""
    return [reply_bytes(m) for m in log if m.direction == "B->Q" and m.request == request]


def u64_reply(request: int, value: int) -> bytes:
    """The exact bytes of a u64 reply."""
    return struct.pack("<IIIQ", request, 0x5, 8, value)


@pytest.mark.parametrize("flavour", FLAVOUR_NAMES, indirect=True)
def test_realize_replies(open_session: SessionFactory, backend: BackendSpec,
                         flavour: QemuFlavour) -> None:
    """Feature offers, queue count, slots and config replies, byte by byte."""
    s = open_session(start=False)
    neg = s.realize()
    config = s.probe()
    log = s.frontend.log
    assert neg.offered_features & REQUIRED_FEATURES == REQUIRED_FEATURES
    assert not neg.offered_features & Feature.RESOURCE_USERPTR_V3, "bit 5 offered by default"
    assert neg.offered_protocol & REQUIRED_PROTOCOL == REQUIRED_PROTOCOL
    assert replies(log, FrontendReq.GET_FEATURES) == [
        u64_reply(FrontendReq.GET_FEATURES, neg.offered_features)] * 2
    assert replies(log, FrontendReq.GET_PROTOCOL_FEATURES) == [
        u64_reply(FrontendReq.GET_PROTOCOL_FEATURES, neg.offered_protocol)]
    assert replies(log, FrontendReq.GET_QUEUE_NUM) == [u64_reply(FrontendReq.GET_QUEUE_NUM, 2)]
    config_replies = replies(log, FrontendReq.GET_CONFIG)
    assert len(config_replies) == 2
    for raw in config_replies:
        assert raw[:24] == struct.pack("<IIIIII", FrontendReq.GET_CONFIG, 0x5, 28, 0, 16, 0)
        assert len(raw) == 12 + 28
    assert config.events_read == 0
    if not backend.is_ours:
        assert config.num_capsets == 0  # 2D only; ours publishes its own capsets
    if backend.is_ours:
        assert neg.offered_features & (Feature.EDID | Feature.RESOURCE_UUID) == (
            Feature.EDID | Feature.RESOURCE_UUID)
        assert replies(log, FrontendReq.GET_MAX_MEM_SLOTS) == [
            u64_reply(FrontendReq.GET_MAX_MEM_SLOTS, 32)]
    # nothing but requested replies came back
    assert [m.request for m in log if m.direction == "B->Q"] == [
        m.request for m in log if m.direction == "Q->B"
        and (m.flags & HeaderFlag.NEED_REPLY or m.request in (
            FrontendReq.GET_FEATURES, FrontendReq.GET_PROTOCOL_FEATURES,
            FrontendReq.GET_QUEUE_NUM, FrontendReq.GET_MAX_MEM_SLOTS, FrontendReq.GET_CONFIG))]


@pytest.mark.parametrize("flavour", FLAVOUR_NAMES, indirect=True)
def test_start_in_both_flavours(open_session: SessionFactory, flavour: QemuFlavour) -> None:
    """DRIVER_OK: vring messages carry NEED_REPLY in 10.x only, every ack is u64 0."""
    s = open_session()
    s.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)
    vring = {FrontendReq.SET_VRING_KICK, FrontendReq.SET_VRING_CALL,
             FrontendReq.SET_VRING_ERR, FrontendReq.SET_VRING_ENABLE}
    sent = [m for m in s.frontend.log if m.direction == "Q->B" and m.request in vring]
    want_flags = 0x1 if flavour is QEMU_7_2 else 0x9
    assert sent and {m.flags for m in sent} == {want_flags}
    acks = [reply_bytes(m) for m in s.frontend.log
            if m.direction == "B->Q" and m.request in vring]
    assert acks == ([] if flavour is QEMU_7_2
                    else [u64_reply(m.request, 0) for m in sent])


def test_need_reply_honoured_on_every_request(open_session: SessionFactory) -> None:
    """NEED_REPLY on every request without a reply body gets exactly one u64 0 ack."""
    s = open_session(need_reply_everywhere=True)
    s.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)
    s.stop()
    s.cont()
    s.gpu.create_2d(1, 2, 16, 16).expect(Resp.OK_NODATA)
    log = s.frontend.log
    asked = [m for m in log if m.direction == "Q->B" and m.flags & HeaderFlag.NEED_REPLY]
    names = {m.name for m in asked}
    assert {"SET_OWNER", "SET_FEATURES", "SET_VRING_NUM", "SET_VRING_BASE", "SET_VRING_ADDR",
            "SET_VRING_KICK", "SET_VRING_CALL", "SET_VRING_ERR", "SET_VRING_ENABLE",
            "ADD_MEM_REG", "GPU_SET_SOCKET"} <= names
    acks = [m for m in log if m.direction == "B->Q" and m.request in {a.request for a in asked}
            and m.request != FrontendReq.GET_VRING_BASE]
    assert len(acks) == len(asked)
    assert all(reply_bytes(m) == u64_reply(m.request, 0) for m in acks)


def test_need_reply_on_requests_with_a_reply_body(open_session: SessionFactory,
                                                   backend: BackendSpec) -> None:
    """NEED_REPLY on GET_*: the normal reply, flags exactly 0x5, no extra ack."""
    backend.require_ours("libvhost-user echoes NEED_REPLY in the reply (flags 0xd, which "
                         "QEMU rejects; QEMU never sets it on GET_*)")
    s = open_session()
    need_reply = int(HeaderFlag.VERSION | HeaderFlag.NEED_REPLY)
    features = s.frontend.call(FrontendReq.GET_FEATURES, flags=need_reply)
    assert struct.unpack("<Q", features)[0] == s.neg.offered_features
    config = s.frontend.call(FrontendReq.GET_CONFIG, encode_config(0, 0, bytes(16)),
                             size=28, flags=need_reply)
    assert config[:12] == struct.pack("<III", 0, 16, 0)
    assert s.frontend.get_u64(FrontendReq.GET_QUEUE_NUM) == 2
    assert not s.frontend.pending(0.2)


def test_unknown_request_fails_ack_and_session_goes_on(open_session: SessionFactory,
                                                       backend: BackendSpec) -> None:
    """An unknown request: failure ack with NEED_REPLY, silence without; still serving."""
    backend.require_ours("libvhost-user panics (exit 1) on an unknown request")
    s = open_session(start=False)
    s.realize()
    fe = s.frontend
    fe.send(99, b"\x00" * 8, flags=int(HeaderFlag.VERSION | HeaderFlag.NEED_REPLY))
    payload = fe.read_reply(99, 8)
    assert struct.unpack("<Q", payload)[0] != 0
    assert s.backend.wait_stderr("99"), "no log line names the unknown request"
    fe.send(99, b"", flags=int(HeaderFlag.VERSION))
    assert fe.get_u64(FrontendReq.GET_FEATURES) == s.neg.offered_features
    s.probe()
    s.driver_ok()
    s.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)


def test_unoffered_feature_bits_are_accepted(open_session: SessionFactory) -> None:
    """SET_FEATURES carries RING_RESET (40), never offered; it is acked and works."""
    s = open_session(need_reply_everywhere=True)
    assert not s.neg.offered_features & Feature.RING_RESET
    assert s.neg.acked_features & Feature.RING_RESET
    set_features = [m for m in s.frontend.log if m.request == FrontendReq.SET_FEATURES]
    assert set_features[0].payload == struct.pack(
        "<Q", s.neg.acked_features | Feature.PROTOCOL_FEATURES)
    s.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)


def test_config_write_is_acked(open_session: SessionFactory) -> None:
    """SET_CONFIG (guest writes events_clear) with NEED_REPLY; reads keep working."""
    s = open_session()
    s.frontend.set_config(encode(GpuConfig(0, 1, 0, 0)))
    assert s.probe(1).events_read == 0
    s.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)


def test_set_mem_table_without_configure_mem_slots(open_session: SessionFactory) -> None:
    """Without CONFIGURE_MEM_SLOTS guest RAM arrives as SET_MEM_TABLE (two regions)."""
    s = open_session(refuse_protocol=int(ProtocolFeature.CONFIGURE_MEM_SLOTS),
                     split_at=16 << 20)
    sent = [m.name for m in s.frontend.log if m.direction == "Q->B"]
    assert "SET_MEM_TABLE" in sent and "ADD_MEM_REG" not in sent
    image = s.gpu.create_image(64, 64, regions=[0, 1])
    assert {s.ram.region_of(seg.gpa) for seg in image.backing} == {0, 1}
    pixels = random_pixels(64, 64, 41)
    image.write_pixels(s.ram, pixels)
    s.gpu.show(image)
    s.sync_display()
    assert np.array_equal(s.console.surface(0)[..., :3], pixels[..., :3])


def test_without_reply_ack(open_session: SessionFactory) -> None:
    """No REPLY_ACK: no NEED_REPLY anywhere, 10.x syncs with GET_FEATURES after ENABLE."""
    s = open_session(refuse_protocol=int(ProtocolFeature.REPLY_ACK))
    s.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)
    log = s.frontend.log
    assert not any(m.flags & HeaderFlag.NEED_REPLY for m in log if m.direction == "Q->B")
    after_enable = [log[i + 1].name for i, m in enumerate(log)
                    if m.request == FrontendReq.SET_VRING_ENABLE]
    assert set(after_enable) == {"GET_FEATURES"}
