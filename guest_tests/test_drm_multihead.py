"""Two outputs (``scripts/vm.py test --heads 2``): each head scans out its own
framebuffer, pixel-exact in QEMU's console for that head, and damage on one head
leaves the other alone."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_tests import drm
from guest_tests import drm_checks as checks
from guest_tests.guest_helpers import Screendumps

CLIP = (64, 48, 301, 207)  # x1, y1, x2, y2 (exclusive), on head 1

pytestmark = pytest.mark.usefixtures("steady_console")


@pytest.fixture
def every_connector_on() -> Iterator[None]:
    """QEMU enables only head 0 when no UI shows the others, so the guest sees the other
    connectors disconnected (and without modes); force them on as a user would
    (``video=Virtual-2:e``), then give them back to detection."""
    forced = [status for status in sorted(Path("/sys/class/drm").glob("card0-*/status"))
              if status.read_text().strip() != "connected"]
    for status in forced:
        status.write_text("on")
    yield
    for status in forced:
        status.write_text("detect")


@pytest.mark.usefixtures("every_connector_on")
def test_each_head_shows_its_own_framebuffer(display: drm.Display, screendump: Screendumps,
                                             kernel_log: checks.KernelLog) -> None:
    outputs = drm.all_outputs(display.card)
    if len(outputs) < 2:
        pytest.skip("the GPU has one output: run `scripts/vm.py test --heads 2`")
    pictures, fbs = [], []
    for head, output in enumerate(outputs[:2]):
        width, height = output.mode.size
        pictures.append(checks.random_rgb(height, width, seed=60 + head))
        fbs.append(display.framebuffer(pictures[head]))
        display.card.set_crtc(output.crtc_id, fbs[head].fb_id,
                              [output.connector.connector_id], output.mode)
    for head in range(2):
        screendump.check(f"multihead-{head}", pictures[head], head=head)

    patch = checks.random_rgb(CLIP[3] - CLIP[1], CLIP[2] - CLIP[0], seed=62)
    fbs[1].buffer.write_rgb(patch, CLIP[0], CLIP[1])
    pictures[1][CLIP[1]:CLIP[3], CLIP[0]:CLIP[2]] = patch
    display.card.dirty_fb(fbs[1].fb_id, [CLIP])
    screendump.check("multihead-1-damage", pictures[1], head=1)
    screendump.check("multihead-0-untouched", pictures[0], head=0, timeout=0)
    assert not kernel_log.trouble()
