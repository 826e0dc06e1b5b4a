"""VM stop and cont (``virsh suspend`` / ``virsh resume``): the display and the device
survive, pixel-exact.

On stop QEMU closes the display socket and takes the rings back (GET_VRING_BASE); on
cont it restarts them from the saved bases and hands the back-end a new display socket
(a second GPU_SET_SOCKET), on which the back-end must announce the scanout again.  The
host runner does the stop and cont when the guest asks (scripts/vmrunner/vmpause.py).
"""

from __future__ import annotations

import pytest

from guest_tests import drm
from guest_tests import drm_checks as checks
from guest_tests.guest_helpers import ControlChannel, Screendumps

CLIP = (101, 67, 390, 301)  # x1, y1, x2, y2 (exclusive)
CYCLES = 2  # the second cycle replaces a display socket that itself replaced one

pytestmark = pytest.mark.usefixtures("steady_console")


def test_display_and_commands_survive_stop_cont(
        display: drm.Display, screendump: Screendumps, control_channel: ControlChannel,
        kernel_log: checks.KernelLog, vgpu_backend: str) -> None:
    if vgpu_backend == "reference":
        pytest.skip("QEMU's C back-end keeps the display socket QEMU closed on stop: it "
                    "refuses cont's GPU_SET_SOCKET (assertion 'g->sock_fd == -1') and dies "
                    "of SIGPIPE at its next display message")
    width, height = display.size
    pictures = [checks.random_rgb(height, width, seed=40 + i) for i in range(2)]
    fbs = [display.framebuffer(picture) for picture in pictures]
    display.show(fbs[0])
    checks.expect_screen(screendump, "stopcont-before", pictures[0])
    shown = 0
    for cycle in range(1, CYCLES + 1):
        control_channel.pause_vm()
        checks.expect_screen(screendump, f"stopcont-{cycle}-resumed", pictures[shown])

        # damage flows on the new display socket
        patch = checks.random_rgb(CLIP[3] - CLIP[1], CLIP[2] - CLIP[0], seed=50 + cycle)
        fbs[shown].buffer.write_rgb(patch, CLIP[0], CLIP[1])
        pictures[shown][CLIP[1]:CLIP[3], CLIP[0]:CLIP[2]] = patch
        display.card.dirty_fb(fbs[shown].fb_id, [CLIP])
        checks.expect_screen(screendump, f"stopcont-{cycle}-damage", pictures[shown])

        # a page flip: SET_SCANOUT of another resource, answered from the resumed ring
        shown = 1 - shown
        display.card.page_flip(display.output.crtc_id, fbs[shown].fb_id, user_data=cycle)
        event = display.card.read_flip_event(timeout=10.0)
        assert event.user_data == cycle
        checks.expect_screen(screendump, f"stopcont-{cycle}-flip", pictures[shown])
    assert not kernel_log.trouble()
