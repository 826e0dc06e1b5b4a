"""Hypothesis: random command bytes and random descriptor chains never kill the device.

One back-end session serves all examples of a test (that is the point: state piles
up).  After every example the next valid command must be answered; at teardown the
back-end must exit 0 and QEMU must not have seen a display-protocol violation.
"""

from __future__ import annotations

import struct
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from protocol.virtio_gpu import CtrlHdr
from protocol.virtio_gpu_codes import Cmd, Resp
from protocol.virtqueue import DescFlag
from protocol.wire import encode
from tests.frontend import gpu_commands as cmds
from tests.frontend.guest_ram import Segment
from tests.frontend.session import Session
from tests.integration.conftest import BackendSpec, SessionFactory

PERSISTENT = settings(max_examples=200, deadline=None, derandomize=True,
                      suppress_health_check=[HealthCheck.function_scoped_fixture,
                                             HealthCheck.too_slow])
#: room for the largest 2D response (EDID, 1056 bytes) and then some
RESPONSE_ROOM = 2048

RESPONSE_CODES = frozenset(int(r) for r in Resp)

u32 = st.one_of(st.integers(0, 8), st.integers(0, 0xFFFFFFFF),
                st.sampled_from([63, 64, 4096, 16384, 16385, 0x7FFFFFFF, 0xFFFFFFFF]))


@st.composite
def command_bytes(draw: st.DrawFn) -> bytes:
    """A command header with a plausible or random type, then random struct words."""
    if draw(st.integers(0, 9)) == 0:
        return draw(st.binary(max_size=200))
    cmd_type = draw(st.one_of(st.sampled_from(list(Cmd)), st.integers(0, 0xFFFFFFFF)))
    flags = draw(st.one_of(st.sampled_from([0, 1, 3]), st.integers(0, 0xFFFFFFFF)))
    header = encode(CtrlHdr(cmd_type, flags, draw(st.integers(0, (1 << 64) - 1)),
                            draw(u32), draw(st.integers(0, 255))))
    words = draw(st.lists(u32, max_size=24))
    body = struct.pack(f"<{len(words)}I", *words)
    return header + body[:draw(st.integers(0, len(body)))] + draw(st.binary(max_size=8))


@pytest.fixture
def ours(open_session: SessionFactory, backend: BackendSpec) -> Session:
    """A started session on our back-end (the reference exits on hostile input)."""
    backend.require_ours("libvhost-user panics and exits on hostile rings")
    return open_session(indirect=False)


@PERSISTENT
@given(command=command_bytes())
def test_random_commands_are_answered(ours: Session, command: bytes) -> None:
    """Any command bytes get a well-formed response; the next command works."""
    resp = ours.gpu.run(command or b"\0", RESPONSE_ROOM)
    assert 24 <= resp.used_len <= RESPONSE_ROOM
    assert resp.type in RESPONSE_CODES, resp.type_name
    assert ours.backend.alive()
    ours.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)


@st.composite
def hostile_chain(draw: st.DrawFn) -> tuple[list[tuple[str, int, int, int]], int]:
    """Up to 5 descriptors ``(buffer kind, length, flags, next)`` and the head index."""
    kinds = st.sampled_from(["command", "response", "unbacked", "end of RAM", "wrap",
                             "table"])
    descs = draw(st.lists(st.tuples(
        kinds, st.one_of(st.integers(0, 2048), st.sampled_from([20, 0xFFFFFFFF])),
        st.integers(0, 7), st.integers(0, 72)), min_size=1, max_size=5))
    head = draw(st.one_of(st.just(40), st.integers(0, 70)))
    return descs, head


@settings(PERSISTENT, max_examples=80)  # up to 0.3 s each: a broken ring is waited out
@given(chain=hostile_chain())
def test_random_chains_never_kill_the_device(
        ours: Session, chain: tuple[list[tuple[str, int, int, int]], int]) -> None:
    """Arbitrary descriptors at slots 40..: answered or the ring breaks; a restart heals."""
    descs, head = chain
    s, q = ours, ours.queues[0]
    command = s.gpu.prepare(cmds.get_display_info(), RESPONSE_ROOM)
    assert command.response is not None
    table_gpa = s.ram.alloc_contiguous(4096)
    top = s.ram.regions[-1].end
    addresses = {"command": command.out[0].gpa, "response": command.response.gpa,
                 "unbacked": s.ram.unbacked_gpa(), "end of RAM": top - 16,
                 "wrap": (1 << 64) - 16, "table": table_gpa}
    # an indirect table with a valid command and response, so INDIRECT can succeed
    s.ram.write(table_gpa, struct.pack("<QIHHQIHH", command.out[0].gpa, 24,
                                       int(DescFlag.NEXT), 1, command.response.gpa,
                                       RESPONSE_ROOM, int(DescFlag.WRITE), 0))
    writable = 0
    for i, (kind, length, flags, nxt) in enumerate(descs):
        q.write_desc(40 + i, addresses[kind], length, flags, nxt)
        writable += length if flags & DescFlag.WRITE else 0
    q.put_head(head)
    q.submit(force_kick=True)
    deadline = time.monotonic() + 0.3
    while q.used_idx() == q.last_used and time.monotonic() < deadline:
        time.sleep(0.005)
    if q.used_idx() != q.last_used:
        elem = q.used_ring[q.last_used % q.num]
        assert int(elem["len"]) <= max(writable, RESPONSE_ROOM)
    assert s.backend.alive(), s.backend.stderr[-2000:]
    s.restart_queue(0)
    s.ram.free(table_gpa, 4096)
    for alloc in command.allocations:
        s.ram.free(alloc.gpa, alloc.length)
    s.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)


@PERSISTENT
@given(entries=st.lists(st.tuples(st.sampled_from(["ram", "unbacked", "wrap", "end"]),
                                  st.integers(0, 1 << 20)), max_size=40),
       claimed=st.one_of(st.none(), st.integers(0, 0xFFFFFFFF)))
def test_random_backing_entries(ours: Session, entries: list[tuple[str, int]],
                                claimed: int | None) -> None:
    """ATTACH_BACKING with hostile entries and counts: OK or an error, never a crash."""
    gpu, ram = ours.gpu, ours.ram
    rid = gpu.new_resource_id()
    gpu.create_2d(rid, 2, 64, 64).expect(Resp.OK_NODATA)
    top = ram.regions[-1].end
    base = {"ram": 0x10000, "unbacked": ram.unbacked_gpa(), "wrap": (1 << 64) - 4096,
            "end": top - 4096}
    segments = [Segment(base[kind], length) for kind, length in entries]
    resp = gpu.attach_backing(rid, segments, nr_entries=claimed)
    assert resp.type in (Resp.OK_NODATA, Resp.ERR_INVALID_PARAMETER, Resp.ERR_UNSPEC,
                         Resp.ERR_OUT_OF_MEMORY), resp.type_name
    transfer = gpu.transfer(rid, cmds.Rect(0, 0, 64, 64))
    assert transfer.type in (Resp.OK_NODATA, Resp.ERR_INVALID_PARAMETER, Resp.ERR_UNSPEC)
    gpu.unref(rid).expect(Resp.OK_NODATA)
