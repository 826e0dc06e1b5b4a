"""Fenced responses and many commands per kick."""

from __future__ import annotations

from protocol.virtio_gpu_codes import CtrlFlag, Format, Resp
from tests.frontend import gpu_commands as cmds
from tests.frontend.gpu_commands import Fence, Rect
from tests.frontend.session import Session
from tests.integration.conftest import BackendSpec, SessionFactory


def test_fenced_responses_echo_the_fence(session: Session) -> None:
    """FENCE set, same fence_id and ctx_id, on OK and on error responses."""
    gpu = session.gpu
    fences = [Fence((1 << 40) + 7, 3), Fence(8, 0), Fence(0xFFFF_FFFF_FFFF_FFFF, 9)]
    responses = [
        gpu.get_display_info(fences[0]).expect(Resp.OK_DISPLAY_INFO),
        gpu.create_2d(4, Format.B8G8R8X8_UNORM, 8, 8, fences[1]).expect(Resp.OK_NODATA),
        gpu.create_2d(4, Format.B8G8R8X8_UNORM, 8, 8, fences[2])
        .expect(Resp.ERR_INVALID_RESOURCE_ID),
    ]
    for fence, resp in zip(fences, responses, strict=True):
        assert resp.hdr.flags & CtrlFlag.FENCE
        assert (resp.hdr.fence_id, resp.hdr.ctx_id) == (fence.fence_id, fence.ctx_id)


def test_unfenced_responses_have_no_fence(session: Session) -> None:
    """Without FENCE the response header carries no fence."""
    resp = session.gpu.create_2d(4, Format.B8G8R8X8_UNORM, 8, 8).expect(Resp.OK_NODATA)
    assert (resp.hdr.flags, resp.hdr.fence_id, resp.hdr.ctx_id) == (0, 0, 0)


def test_fence_with_ring_idx(session: Session, backend: BackendSpec) -> None:
    """With INFO_RING_IDX the response also carries the ring index."""
    backend.require_ours("it copies FENCE, fence_id and ctx_id only")
    resp = session.gpu.create_2d(4, Format.B8G8R8X8_UNORM, 8, 8, Fence(12, 1, ring_idx=2))
    resp.expect(Resp.OK_NODATA)
    assert resp.hdr.flags == CtrlFlag.FENCE | CtrlFlag.INFO_RING_IDX
    assert (resp.hdr.fence_id, resp.hdr.ctx_id, resp.hdr.ring_idx) == (12, 1, 2)


def test_64_commands_per_kick(open_session: SessionFactory) -> None:
    """A full 64-entry ring of INDIRECT chains in one kick, answered in order."""
    s = open_session(indirect=True)
    gpu, ctrl = s.gpu, s.queues[0]
    for round_ in range(3):
        batch = []
        for i in range(32):
            rid = 1000 + i
            batch.append(gpu.prepare(cmds.resource_create_2d(rid, Format.B8G8R8X8_UNORM,
                                                             64, 64, Fence(round_ * 64 + i))))
            batch.append(gpu.prepare(cmds.resource_unref(rid)))
        kicks = ctrl.stats.kicks
        responses = gpu.submit(batch)
        assert ctrl.stats.kicks == kicks + 1
        assert [r.type for r in responses] == [Resp.OK_NODATA] * 64
        assert all(r.used_len == 24 for r in responses)
        assert [r.hdr.fence_id for r in responses[::2]] == [round_ * 64 + i for i in range(32)]


def test_batch_of_direct_chains_with_a_display_round_trip(session: Session) -> None:
    """32 two-descriptor chains per kick, a GET_DISPLAY_INFO in the middle."""
    gpu = session.gpu
    image = gpu.create_image(32, 32)
    batch = [gpu.prepare(cmds.transfer_to_host_2d(image.resource_id, Rect(0, 0, 32, 32)))
             for _ in range(15)]
    batch.append(gpu.prepare(cmds.get_display_info(), cmds.DISPLAY_INFO_RESP_SIZE))
    batch += [gpu.prepare(cmds.resource_flush(image.resource_id, Rect(0, 0, 32, 32)))
              for _ in range(16)]
    responses = gpu.submit(batch)
    assert responses[15].type == Resp.OK_DISPLAY_INFO
    assert [r.type for r in responses[:15] + responses[16:]] == [Resp.OK_NODATA] * 31
