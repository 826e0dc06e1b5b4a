"""KMS with dumb buffers: SETCRTC, DIRTYFB partial updates and page flips, pixel-exact.

The tests hold DRM master, so fbcon cannot draw on the screen (see drm.Display); closing
the card hands the display back to the console, which the last test checks.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from guest_tests import drm
from guest_tests import drm_checks as checks
from guest_tests.guest_helpers import Screendumps

#: odd sizes and offsets catch stride and off-by-one errors in partial transfers
CLIP_A = (37, 53, 248, 150)  # x1, y1, x2, y2 (exclusive)
CLIP_B = (701, 409, 1000, 662)
STABLE_FOR = 1.0  # seconds a partial update must stay as it is

pytestmark = pytest.mark.usefixtures("steady_console")


def paste(base: drm.Image, patch: drm.Image, clip: tuple[int, int, int, int]) -> drm.Image:
    """``base`` with ``patch`` at ``clip``."""
    out = base.copy()
    out[clip[1]:clip[3], clip[0]:clip[2]] = patch
    return out


def clip_shape(clip: tuple[int, int, int, int]) -> tuple[int, int]:
    """(height, width) of a clip rectangle."""
    return clip[3] - clip[1], clip[2] - clip[0]


def test_setcrtc_scans_out_a_dumb_buffer(display: drm.Display, screendump: Screendumps,
                                         kernel_log: checks.KernelLog) -> None:
    width, height = display.size
    picture = checks.random_rgb(height, width, seed=1)
    fb = display.framebuffer(picture)
    display.show(fb)

    crtc = display.card.crtc(display.output.crtc_id)
    assert crtc.fb_id == fb.fb_id and crtc.mode == display.output.mode
    checks.expect_screen(screendump, "drm-setcrtc", picture)
    screendump.png("drm-setcrtc")
    assert not kernel_log.trouble()


def test_dirtyfb_updates_only_the_clipped_region(display: drm.Display,
                                                 screendump: Screendumps,
                                                 kernel_log: checks.KernelLog) -> None:
    width, height = display.size
    before = checks.random_rgb(height, width, seed=2)
    fb = display.framebuffer(before)
    display.show(fb)
    checks.expect_screen(screendump, "drm-dirty-before", before)

    patch_a = checks.random_rgb(*clip_shape(CLIP_A), seed=3)
    patch_b = checks.random_rgb(*clip_shape(CLIP_B), seed=4)
    fb.buffer.write_rgb(patch_a, CLIP_A[0], CLIP_A[1])
    fb.buffer.write_rgb(patch_b, CLIP_B[0], CLIP_B[1])  # written, not yet reported dirty
    display.card.dirty_fb(fb.fb_id, [CLIP_A])
    only_a = paste(before, patch_a, CLIP_A)
    checks.expect_screen(screendump, "drm-dirty-a", only_a)
    time.sleep(STABLE_FOR)  # the undamaged write must not leak out later either
    checks.expect_screen(screendump, "drm-dirty-a", only_a, timeout=0)

    display.card.dirty_fb(fb.fb_id, [CLIP_B])
    checks.expect_screen(screendump, "drm-dirty-b", paste(only_a, patch_b, CLIP_B))
    assert not kernel_log.trouble()


def test_page_flips_alternate_between_two_framebuffers(display: drm.Display,
                                                       screendump: Screendumps,
                                                       kernel_log: checks.KernelLog) -> None:
    width, height = display.size
    pictures = [checks.random_rgb(height, width, seed=5), checks.random_rgb(height, width, seed=6)]
    fbs = [display.framebuffer(picture) for picture in pictures]
    display.show(fbs[0])
    checks.expect_screen(screendump, "drm-flip-0", pictures[0])

    crtc_id = display.output.crtc_id
    for flip in range(1, 7):
        target = flip % 2
        display.card.page_flip(crtc_id, fbs[target].fb_id, user_data=flip)
        event = display.card.read_flip_event(timeout=10.0)
        assert (event.user_data, event.crtc_id) == (flip, crtc_id)
        assert display.card.crtc(crtc_id).fb_id == fbs[target].fb_id
        checks.expect_screen(screendump, f"drm-flip-{flip}", pictures[target])
    assert not kernel_log.trouble()


def test_closing_the_card_gives_the_display_back_to_the_console(
        screendump: Screendumps, kernel_log: checks.KernelLog) -> None:
    display = drm.Display()
    try:
        width, height = display.size
        picture = checks.random_rgb(height, width, seed=7)
        ours = display.framebuffer(picture)
        display.show(ours)
        checks.expect_screen(screendump, "drm-before-close", picture)
    finally:
        display.close()

    console = checks.read_fbdev_rgb("fb0")
    assert not np.array_equal(console, picture)
    checks.expect_screen(screendump, "drm-console-restored", console)
    with drm.Card() as card:
        crtc = card.crtc(drm.find_output(card).crtc_id)
    assert crtc.fb_id not in (0, ours.fb_id), "the console's framebuffer is not scanned out"
    assert not kernel_log.trouble()
