"""Our back-end with ``--poll-max-us``: the event loop busy-polls before it sleeps, and
serves exactly as it does without (answers, order, interrupts, display, clean exit)."""

from __future__ import annotations

import pytest

from protocol.virtio_gpu_codes import Format, Resp
from tests.frontend import gpu_commands as cmds
from tests.frontend.gpu_commands import Fence
from tests.frontend.session import Session
from tests.integration.conftest import BackendSpec, SessionFactory


@pytest.fixture
def polled(open_session: SessionFactory, backend: BackendSpec) -> Session:
    """A session with our back-end busy-polling up to 2 ms before each sleep."""
    backend.require_ours("it has no --poll-max-us")
    return open_session(backend_args=("--poll-max-us", "2000"), indirect=True)


def test_the_start_up_line_says_it_polls(polled: Session) -> None:
    assert polled.backend.wait_stderr("busy-polls up to 2000 us")


def test_batches_and_display_round_trips_while_polling(polled: Session) -> None:
    """Kicks close together (the window opens) and far apart; every command answered
    in order, with its fence, and every completion interrupted."""
    gpu, ctrl = polled.gpu, polled.queues[0]
    for round_ in range(20):
        batch = []
        for i in range(32):
            rid = 100 + i
            batch.append(gpu.prepare(cmds.resource_create_2d(
                rid, Format.B8G8R8X8_UNORM, 16, 16, Fence(round_ * 32 + i))))
            batch.append(gpu.prepare(cmds.resource_unref(rid)))
        responses = gpu.submit(batch)
        assert [r.type for r in responses] == [Resp.OK_NODATA] * 64
        assert [r.hdr.fence_id for r in responses[::2]] == [round_ * 32 + i
                                                             for i in range(32)]
        modes = gpu.get_display_info().display_modes()  # over the display socket
        assert modes[0].enabled and (modes[0].width, modes[0].height) == (1280, 800)
    gpu.create_2d(7, Format.B8G8R8X8_UNORM, 8, 8).expect(Resp.OK_NODATA)
    gpu.create_2d(7, Format.B8G8R8X8_UNORM, 8, 8).expect(Resp.ERR_INVALID_RESOURCE_ID)
    assert ctrl.stats.missed_notifications == 0
