"""Disconnects at every stage, --fd mode, SIGTERM: the back-end exits cleanly."""

from __future__ import annotations

import signal

import pytest

from protocol.virtio_gpu_codes import Resp
from tests.frontend.session import Session
from tests.integration.conftest import SessionFactory

STAGES = ["connected", "realized", "started", "busy", "stopped", "display closed"]


def reach(s: Session, stage: str) -> None:
    """Drive a fresh session to ``stage``."""
    if stage == "connected":
        return
    s.realize()
    s.probe()
    if stage == "realized":
        return
    s.driver_ok()
    if stage == "started":
        return
    image = s.gpu.create_image(64, 64)
    s.gpu.show(image)
    s.sync_display()
    s.gpu.create_image(32, 32)  # one more resource with backing, never freed by the guest
    if stage == "stopped":
        s.stop()
    elif stage == "display closed":
        s.display.close()  # QEMU drops the display first, then goes away


@pytest.mark.parametrize("stage", STAGES)
def test_disconnect_exits_zero(open_session: SessionFactory, stage: str) -> None:
    """After QEMU disconnects the back-end frees everything and exits 0."""
    s = open_session(start=False)
    reach(s, stage)
    assert s.close() == 0


def test_fd_mode(open_session: SessionFactory) -> None:
    """``--fd N`` with an inherited connected socket (libvirt's way)."""
    s = open_session(fd_mode=True)
    s.gpu.get_display_info().expect(Resp.OK_DISPLAY_INFO)
    assert s.close() == 0


def test_repeated_stop_cont(session: Session) -> None:
    """Ring bases carry over several stop/cont cycles."""
    for cycle in range(3):
        for _ in range(cycle + 1):
            session.gpu.create_2d(session.gpu.new_resource_id(), 2, 8, 8
                                  ).expect(Resp.OK_NODATA)
        assert session.stop() == [q.avail_idx for q in session.queues]
        session.cont()
    session.gpu.create_2d(session.gpu.new_resource_id(), 2, 8, 8).expect(Resp.OK_NODATA)


def test_sigterm_ends_the_process(session: Session) -> None:
    """SIGTERM (the launcher's stop) ends the back-end promptly."""
    session.gpu.create_image(16, 16)
    session.backend.proc.send_signal(signal.SIGTERM)
    code = session.backend.wait_exit(5)
    assert code in (0, -signal.SIGTERM, 128 + signal.SIGTERM)
    session.close(expect_exit=None)
