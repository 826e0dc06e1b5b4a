"""The hardware cursor: MODE_CURSOR2 / MODE_CURSOR images and moves.

What the guest can verify honestly: QEMU's screendump shows the scanout surface without
the cursor (a back-end must send the cursor on its own, CURSOR_UPDATE / CURSOR_POS on the
display socket, never blend it into the scanout), so the screen must stay exactly the
primary framebuffer while the cursor is shown and moved.  The cursor image upload is a
fenced TRANSFER_TO_HOST_2D that the ioctl waits for (virtio_gpu_cursor_plane_update), and
every update or move takes one of the 16 cursor-queue entries: a device that stopped
returning them would block the moves forever.  The cursor's own pixels and position are
not visible to the guest.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import numpy as np
import pytest

from guest_tests import drm
from guest_tests import drm_checks as checks
from guest_tests.guest_helpers import Screendumps

CURSOR_SIZE = 64
HOTSPOT = (7, 9)
MOVES = 200  # many times the cursor queue's 16 entries
IOCTL_TIMEOUT = 60.0

pytestmark = pytest.mark.usefixtures("steady_console")


def bounded(action: Callable[[], None], what: str, timeout: float = IOCTL_TIMEOUT) -> None:
    """Run ``action`` in a thread; fail if it has not returned within ``timeout``
    (ioctls that wait for the device sleep uninterruptibly when it never answers)."""
    errors: list[BaseException] = []

    def run() -> None:
        try:
            action()
        except BaseException as error:  # re-raised in the test's thread
            errors.append(error)

    worker = threading.Thread(target=run, name=what, daemon=True)
    worker.start()
    worker.join(timeout)
    if worker.is_alive():
        raise AssertionError(f"{what} did not return within {timeout} s: the device "
                             "stopped answering")
    if errors:
        raise errors[0]


def cursor_image(seed: int) -> drm.Image:
    """A 64x64 ARGB picture as (H, W, 4) bytes B, G, R, A with graded alpha."""
    bgra = np.random.default_rng(seed).integers(0, 256, (CURSOR_SIZE, CURSOR_SIZE, 4),
                                                dtype=np.uint8)
    bgra[..., 3] = np.linspace(0, 255, CURSOR_SIZE, dtype=np.uint8)[:, None]
    return bgra


def cursor_buffer(card: drm.Card, seed: int) -> drm.DumbBuffer:
    """A 64x64 dumb buffer holding ``cursor_image(seed)``."""
    buffer = card.create_dumb(CURSOR_SIZE, CURSOR_SIZE)
    buffer.store(cursor_image(seed))
    return buffer


def cursor_path(width: int, height: int) -> list[tuple[int, int]]:
    """MOVES positions sweeping the screen, partly off its edges at both ends."""
    t = np.linspace(0.0, 1.0, MOVES)
    xs = (-CURSOR_SIZE // 2 + t * (width + CURSOR_SIZE // 2)).astype(int)
    ys = (-CURSOR_SIZE // 2 + (0.5 - 0.5 * np.cos(6 * np.pi * t)) * (height + CURSOR_SIZE // 2))
    return list(zip(xs.tolist(), ys.astype(int).tolist(), strict=True))


def test_cursor_size_caps(display: drm.Display) -> None:
    assert display.card.get_cap(drm.CAP_CURSOR_WIDTH) == CURSOR_SIZE
    assert display.card.get_cap(drm.CAP_CURSOR_HEIGHT) == CURSOR_SIZE


def test_cursor_set_move_and_hide(display: drm.Display, screendump: Screendumps,
                                  kernel_log: checks.KernelLog) -> None:
    card, crtc_id = display.card, display.output.crtc_id
    width, height = display.size
    picture = checks.random_rgb(height, width, seed=11)
    fb = display.framebuffer(picture)
    display.show(fb)
    checks.expect_screen(screendump, "drm-cursor-primary", picture)

    first = cursor_buffer(card, seed=12)
    emitted_before = checks.fence_ids()[1]
    bounded(lambda: card.set_cursor2(crtc_id, first.handle, CURSOR_SIZE, CURSOR_SIZE,
                                     *HOTSPOT), "MODE_CURSOR2 (fenced image upload)")
    completed, emitted = checks.fence_ids()
    assert emitted > emitted_before, "no fenced cursor-image transfer was sent"
    assert completed == emitted, f"fence {emitted} emitted, device completed {completed}"

    path = cursor_path(width, height)

    def sweep() -> None:
        for x, y in path:
            card.move_cursor(crtc_id, x, y)

    bounded(sweep, f"{MOVES} cursor moves")
    card.move_cursor(crtc_id, width // 2, height // 2)
    checks.expect_screen(screendump, "drm-cursor-shown", picture)  # not blended in

    second = cursor_buffer(card, seed=13)
    bounded(lambda: card.set_cursor(crtc_id, second.handle, CURSOR_SIZE, CURSOR_SIZE),
            "MODE_CURSOR (second image)")
    completed, emitted = checks.fence_ids()
    assert completed == emitted, f"fence {emitted} emitted, device completed {completed}"
    bounded(lambda: card.set_cursor(crtc_id, 0, 0, 0), "MODE_CURSOR hide")
    first.destroy()
    second.destroy()

    clip = (width // 4, height // 4, width // 4 + 160, height // 4 + 90)
    patch = checks.random_rgb(90, 160, seed=14)
    fb.buffer.write_rgb(patch, clip[0], clip[1])
    card.dirty_fb(fb.fb_id, [clip])
    after = picture.copy()
    after[clip[1]:clip[3], clip[0]:clip[2]] = patch
    checks.expect_screen(screendump, "drm-cursor-after", after)  # the device still works
    assert not kernel_log.trouble()
