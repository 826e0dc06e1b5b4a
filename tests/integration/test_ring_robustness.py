"""Corrupt rings and hostile buffers: the process survives and serves again.

A corrupt ring (loop, index out of range, bad INDIRECT table, avail index jump) is
marked broken: nothing more is processed on it, the other ring keeps working, and
after the front-end restarts it the ring serves again.  Buffers outside guest RAM are
not ring-fatal: an error response when the response buffer is usable, else len 0.
The reference back-end exits (``vu_panic``) on all of these, so they are ours only.
"""

from __future__ import annotations

import time
from collections.abc import Callable

import pytest

from protocol.virtio_gpu_codes import Resp
from protocol.virtqueue import DescFlag
from tests.frontend import gpu_commands as cmds
from tests.frontend.guest_ram import Segment
from tests.frontend.session import Session
from tests.integration.conftest import BackendSpec, SessionFactory

NEXT, WRITE, INDIRECT = int(DescFlag.NEXT), int(DescFlag.WRITE), int(DescFlag.INDIRECT)


@pytest.fixture(autouse=True)
def _ours_only(backend: BackendSpec) -> None:
    backend.require_ours("libvhost-user panics and exits on a corrupt ring or bad buffer")


def display_info_buffers(s: Session) -> tuple[Segment, Segment]:
    """A GET_DISPLAY_INFO command buffer and its response buffer in guest RAM."""
    prepared = s.gpu.prepare(cmds.get_display_info(), cmds.DISPLAY_INFO_RESP_SIZE)
    assert prepared.response is not None
    return prepared.out[0], prepared.response


def write_table(s: Session, entries: list[tuple[int, int, int, int]]) -> Segment:
    """An indirect descriptor table in guest RAM."""
    raw = b"".join(addr.to_bytes(8, "little") + length.to_bytes(4, "little")
                   + flags.to_bytes(2, "little") + nxt.to_bytes(2, "little")
                   for addr, length, flags, nxt in entries)
    gpa = s.ram.alloc_contiguous(len(raw))
    s.ram.write(gpa, raw)
    return Segment(gpa, len(raw))


def loop_in_next(s: Session) -> None:
    cmd, _ = display_info_buffers(s)
    q = s.queues[0]
    q.write_desc(40, cmd.gpa, cmd.length, NEXT, 41)
    q.write_desc(41, cmd.gpa, cmd.length, NEXT, 42)
    q.write_desc(42, cmd.gpa, cmd.length, NEXT, 40)
    q.put_head(40)


def self_loop(s: Session) -> None:
    cmd, _ = display_info_buffers(s)
    s.queues[0].write_desc(40, cmd.gpa, cmd.length, NEXT, 40)
    s.queues[0].put_head(40)


def head_out_of_range(s: Session) -> None:
    s.queues[0].put_head(s.queues[0].num)


def head_far_out_of_range(s: Session) -> None:
    s.queues[0].put_head(0xFFFF)


def next_out_of_range(s: Session) -> None:
    cmd, _ = display_info_buffers(s)
    s.queues[0].write_desc(40, cmd.gpa, cmd.length, NEXT, s.queues[0].num + 5)
    s.queues[0].put_head(40)


def indirect_length_not_multiple_of_16(s: Session) -> None:
    cmd, resp = display_info_buffers(s)
    table = write_table(s, [(cmd.gpa, cmd.length, NEXT, 1), (resp.gpa, resp.length, WRITE, 0)])
    s.queues[0].write_desc(40, table.gpa, 20, INDIRECT, 0)
    s.queues[0].put_head(40)


def nested_indirect(s: Session) -> None:
    cmd, resp = display_info_buffers(s)
    inner = write_table(s, [(cmd.gpa, cmd.length, NEXT, 1), (resp.gpa, resp.length, WRITE, 0)])
    outer = write_table(s, [(inner.gpa, inner.length, INDIRECT, 0)])
    s.queues[0].write_desc(40, outer.gpa, outer.length, INDIRECT, 0)
    s.queues[0].put_head(40)


def loop_inside_indirect_table(s: Session) -> None:
    cmd, _ = display_info_buffers(s)
    table = write_table(s, [(cmd.gpa, cmd.length, NEXT, 1), (cmd.gpa, cmd.length, NEXT, 0)])
    s.queues[0].write_desc(40, table.gpa, table.length, INDIRECT, 0)
    s.queues[0].put_head(40)


def avail_index_jump(s: Session) -> None:
    q = s.queues[0]
    q.set_avail_idx(q.avail_idx + q.num + 1)


RING_FATAL: dict[str, Callable[[Session], None]] = {
    f.__name__: f for f in (loop_in_next, self_loop, head_out_of_range, head_far_out_of_range,
                            next_out_of_range, indirect_length_not_multiple_of_16,
                            nested_indirect, loop_inside_indirect_table, avail_index_jump)
}


@pytest.mark.parametrize("corrupt", list(RING_FATAL))
def test_corrupt_ring_is_broken_until_restarted(session: Session, corrupt: str) -> None:
    """Survive, stop serving that ring, keep the cursor ring, serve after a restart."""
    gpu, ctrl = session.gpu, session.queues[0]
    gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)
    RING_FATAL[corrupt](session)
    ctrl.submit(force_kick=True)
    used = ctrl.used_idx()
    cmd, resp = display_info_buffers(session)
    ctrl.add([cmd], [resp])
    ctrl.submit(force_kick=True)
    time.sleep(0.5)
    assert session.backend.alive(), session.backend.stderr[-2000:]
    assert ctrl.used_idx() == used, "a broken ring was processed further"
    gpu.move_cursor(0, 5, 5, resource_id=0)  # the other ring still works
    session.restart_queue(0)
    gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)
    gpu.create_2d(1, 2, 8, 8).expect(Resp.OK_NODATA)


def unbacked(s: Session, length: int) -> Segment:
    return Segment(s.ram.unbacked_gpa(), length)


@pytest.mark.parametrize("where", ["unbacked", "crosses the end of RAM", "wraps 2^64"])
def test_command_buffer_outside_ram(session: Session, where: str) -> None:
    """The command cannot be read: an error response in the usable response buffer."""
    top = session.ram.regions[-1].end
    out = {"unbacked": unbacked(session, 24),
           "crosses the end of RAM": Segment(top - 8, 24),
           "wraps 2^64": Segment((1 << 64) - 8, 24)}[where]
    resp = Segment(session.ram.alloc_contiguous(24), 24)
    done = session.gpu.submit_raw([out], [resp])
    assert done.length == 24
    resp_type = int.from_bytes(session.ram.read(resp.gpa, 4), "little")
    assert resp_type >= Resp.ERR_UNSPEC, hex(resp_type)
    session.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)


def test_response_buffer_outside_ram(session: Session) -> None:
    """No usable response buffer: the chain comes back with used length 0."""
    cmd, _ = display_info_buffers(session)
    done = session.gpu.submit_raw([cmd], [unbacked(session, cmds.DISPLAY_INFO_RESP_SIZE)])
    assert done.length == 0
    session.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)


def test_indirect_chain_with_buffer_outside_ram(open_session: SessionFactory) -> None:
    """The same inside an INDIRECT table."""
    s = open_session(indirect=True)
    resp = Segment(s.ram.alloc_contiguous(24), 24)
    done = s.gpu.submit_raw([unbacked(s, 24)], [resp], indirect=True)
    assert done.length == 24
    assert int.from_bytes(s.ram.read(resp.gpa, 4), "little") >= Resp.ERR_UNSPEC
    s.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)
