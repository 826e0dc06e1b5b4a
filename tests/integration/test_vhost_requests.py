"""vhost-user requests at the edges of the protocol: failure acks, bad indices, rings
enabled late or never explicitly, partial config reads, too many fds.

A request that fails with REPLY_ACK negotiated and NEED_REPLY set gets a non-zero u64
ack and the session goes on; only a message the back-end cannot read completely (fds
lost to truncation) ends the session.  QEMU 10.0's reference back-end differs on most
of these (each test names how); those run on ours only.
"""

from __future__ import annotations

import os
import struct
import time

import pytest

from protocol.vhost_user import FrontendReq, HeaderFlag, SingleMemRegion, VringState
from protocol.vhost_user_connection import encode_config
from protocol.virtio_gpu_codes import Feature, Resp
from protocol.wire import encode
from tests.frontend import gpu_commands as cmds
from tests.frontend.session import CTRL, CURSOR, Session
from tests.frontend.vhost_frontend import ReplyError
from tests.integration.conftest import BackendSpec, SessionFactory

NEED_REPLY = int(HeaderFlag.VERSION | HeaderFlag.NEED_REPLY)
RING_PACKED = 1 << 34
#: QEMU's VHOST_MEMORY_BASELINE_NREGIONS, our max_fds_per_message
MAX_FDS = 8


def acked(s: Session, code: int, payload: bytes, fds: tuple[int, ...] = ()) -> int:
    """Send ``code`` with NEED_REPLY; the u64 ack value (0 = success)."""
    s.frontend.send(code, payload, fds, flags=NEED_REPLY)
    return int(struct.unpack("<Q", s.frontend.read_reply(code, 8))[0])


def still_serving(s: Session) -> None:
    """The device answers the next command; the session takes requests."""
    assert s.frontend.get_u64(FrontendReq.GET_FEATURES) == s.neg.offered_features
    s.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)


def test_add_mem_reg_without_fd_fails_its_ack(open_session: SessionFactory,
                                              backend: BackendSpec) -> None:
    """ADD_MEM_REG with no fd: a handler failure, acked non-zero; still serving."""
    backend.require_ours("libvhost-user closes the connection on ADD_MEM_REG without an fd")
    s = open_session()
    region = s.ram.regions[0].to_wire()
    assert acked(s, FrontendReq.ADD_MEM_REG, encode(SingleMemRegion(0, *region))) != 0
    still_serving(s)


def test_rem_mem_reg_of_an_unknown_region_fails_its_ack(open_session: SessionFactory,
                                                        backend: BackendSpec) -> None:
    """REM_MEM_REG of a region the back-end never had: acked non-zero; still serving."""
    backend.require_ours("libvhost-user closes the connection on REM_MEM_REG of an "
                         "unknown region")
    s = open_session()
    known = s.ram.regions[0]
    unknown = SingleMemRegion(0, known.guest_phys_addr + (1 << 40), known.memory_size,
                              known.userspace_addr + (1 << 40), known.mmap_offset)
    assert acked(s, FrontendReq.REM_MEM_REG, encode(unknown)) != 0
    still_serving(s)


def test_packed_rings_are_refused(open_session: SessionFactory,
                                  backend: BackendSpec) -> None:
    """SET_FEATURES with VIRTIO_F_RING_PACKED (34): acked non-zero, the split rings keep
    serving."""
    backend.require_ours("libvhost-user acks RING_PACKED with 0")
    s = open_session()
    features = s.neg.acked_features | Feature.PROTOCOL_FEATURES
    assert acked(s, FrontendReq.SET_FEATURES, struct.pack("<Q", features | RING_PACKED)) != 0
    still_serving(s)


@pytest.mark.parametrize("request_code", [FrontendReq.SET_VRING_NUM,
                                          FrontendReq.SET_VRING_BASE],
                         ids=lambda c: FrontendReq(c).name)
def test_queue_index_beyond_the_device(open_session: SessionFactory, backend: BackendSpec,
                                       request_code: int) -> None:
    """Queue index 2 of a two-queue device: acked non-zero; still serving."""
    backend.require_ours("libvhost-user acks SET_VRING_NUM/BASE of queue 2 with 0")
    s = open_session()
    assert acked(s, request_code, encode(VringState(2, 64))) != 0
    still_serving(s)


@pytest.mark.parametrize("size", [0, 12, 65536])
def test_a_split_ring_size_that_is_not_a_power_of_2_is_refused(
        open_session: SessionFactory, backend: BackendSpec, size: int) -> None:
    """SET_VRING_NUM of 0, 12 or beyond the virtio limit: acked non-zero, the queue keeps
    its size; still serving."""
    backend.require_ours("libvhost-user does not check SET_VRING_NUM sizes")
    s = open_session()
    assert acked(s, FrontendReq.SET_VRING_NUM, encode(VringState(CURSOR, size))) != 0
    assert s.backend.wait_stderr(f"bad size {size} (a power of 2")
    still_serving(s)


def test_too_many_fds_with_one_message_ends_the_session(open_session: SessionFactory,
                                                        backend: BackendSpec) -> None:
    """A message with more fds than QEMU ever sends (9 > 8): the kernel truncates them
    (MSG_CTRUNC); the back-end must not act on it: it closes the session and exits 0."""
    backend.require_ours("libvhost-user answers a message whose fds the kernel truncated")
    s = open_session()
    extra = [os.eventfd(0, os.EFD_CLOEXEC) for _ in range(MAX_FDS + 1)]
    try:
        s.frontend.send(FrontendReq.GET_FEATURES, b"", extra)
    finally:
        for fd in extra:
            os.close(fd)
    with pytest.raises(ReplyError, match="closed"):
        s.frontend.read_reply(FrontendReq.GET_FEATURES, 8)
    assert s.backend.wait_exit(20) == 0
    s.close()


def test_buffers_queued_while_disabled_run_when_enabled(open_session: SessionFactory,
                                                        backend: BackendSpec) -> None:
    """SET_VRING_ENABLE(0): a queued and kicked command is not processed;
    SET_VRING_ENABLE(1) processes it with no further kick."""
    backend.require_ours("libvhost-user processes a kicked ring while it is disabled")
    s = open_session()
    ctrl = s.queues[CTRL]
    s.frontend.set_vring_state(FrontendReq.SET_VRING_ENABLE, CTRL, 0)
    prepared = s.gpu.prepare(cmds.get_display_info(), cmds.DISPLAY_INFO_RESP_SIZE)
    assert prepared.response is not None
    ctrl.add(prepared.out, [prepared.response])
    ctrl.submit(force_kick=True)
    time.sleep(0.3)
    assert ctrl.poll_used() == []
    kicks = ctrl.stats.kicks
    s.frontend.set_vring_state(FrontendReq.SET_VRING_ENABLE, CTRL, 1)
    (done,) = ctrl.wait_used(1, 5.0)
    assert ctrl.stats.kicks == kicks
    raw = s.ram.read(prepared.response.gpa, prepared.response.length)
    cmds.GpuResponse(raw, done.length, done.head).expect(Resp.OK_DISPLAY_INFO)
    still_serving(s)


def test_without_protocol_features_rings_start_enabled(open_session: SessionFactory) -> None:
    """A front-end that never negotiates VHOST_USER_F_PROTOCOL_FEATURES (bit 30) sends
    no SET_VRING_ENABLE: per the vhost-user spec the rings are enabled when
    SET_VRING_KICK arrives, and both queues are served."""
    s = open_session(start=False)
    fe = s.frontend
    s.neg.offered_features = fe.get_u64(FrontendReq.GET_FEATURES) & ~Feature.PROTOCOL_FEATURES
    fe.request(FrontendReq.SET_OWNER)
    for q in (CTRL, CURSOR):
        fe.set_vring_file(FrontendReq.SET_VRING_CALL, q, s.masked_call[q])
        fe.set_vring_file(FrontendReq.SET_VRING_ERR, q, s.err[q])
    s.driver_ok()
    sent = [m for m in fe.log if m.direction == "Q->B"]
    assert FrontendReq.SET_VRING_ENABLE not in {m.request for m in sent}
    set_features = [m for m in sent if m.request == FrontendReq.SET_FEATURES]
    assert not struct.unpack("<Q", set_features[-1].payload)[0] & Feature.PROTOCOL_FEATURES
    s.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)
    s.gpu.move_cursor(0, 5, 6, resource_id=0)


def test_get_config_of_a_window(open_session: SessionFactory,
                                backend: BackendSpec) -> None:
    """GET_CONFIG at offset 4, 8 bytes: the reply names that window and carries config
    bytes 4..12 (events_clear, num_scanouts)."""
    backend.require_ours("vhost-user-gpu's GET_CONFIG copies from byte 0 whatever the offset")
    s = open_session(num_scanouts=3)
    whole = s.frontend.get_config()
    reply = s.frontend.call(FrontendReq.GET_CONFIG, encode_config(4, 0, bytes(8)), 12 + 8)
    assert reply[:12] == struct.pack("<III", 4, 8, 0)
    assert reply[12:] == whole[4:12]
    assert struct.unpack("<I", reply[16:20])[0] == 3  # num_scanouts


@pytest.mark.parametrize(("offset", "size"), [(20, 8), (12, 8), (0, 17)])
def test_get_config_beyond_the_config_space(open_session: SessionFactory,
                                            backend: BackendSpec, offset: int,
                                            size: int) -> None:
    """A window that ends past the 16 config bytes: the empty reply (failure); the
    session goes on."""
    if offset:
        backend.require_ours("vhost-user-gpu's GET_CONFIG copies from byte 0 whatever "
                             "the offset")
    s = open_session()
    assert s.frontend.call(FrontendReq.GET_CONFIG, encode_config(offset, 0, bytes(size)),
                           0) == b""
    still_serving(s)


def _not_an_eventfd(kind: str) -> tuple[int, int | None]:
    """An fd of ``kind`` (and the other end to close, if any)."""
    if kind == "regular-file":
        return os.open("/dev/null", os.O_RDONLY), None
    read_end, write_end = os.pipe()
    os.write(write_end, b"abc")  # readable, but 3 bytes: a short eventfd read
    return read_end, write_end


@pytest.mark.parametrize("kind", ["regular-file", "pipe"])
@pytest.mark.parametrize("request_code", [FrontendReq.SET_VRING_KICK,
                                          FrontendReq.SET_VRING_CALL,
                                          FrontendReq.SET_VRING_ERR],
                         ids=lambda c: FrontendReq(c).name)
def test_a_ring_fd_that_is_not_an_eventfd_is_refused(
        open_session: SessionFactory, backend: BackendSpec, request_code: int,
        kind: str) -> None:
    """KICK/CALL/ERR with a regular file (epoll refuses it) or a pipe holding 3 bytes (a
    short read): acked non-zero, the ring keeps its eventfds; still serving.  Both used
    to end the back-end with a traceback."""
    backend.require_ours("libvhost-user takes any fd")
    s = open_session()
    fd, other = _not_an_eventfd(kind)
    try:
        assert acked(s, request_code, struct.pack("<Q", CTRL), (fd,)) != 0
    finally:
        os.close(fd)
        if other is not None:
            os.close(other)
    assert s.backend.wait_stderr("is not an eventfd")
    still_serving(s)
