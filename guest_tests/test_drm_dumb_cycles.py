"""Many dumb-buffer create/map/destroy cycles with modesets in between, and no leak.

Linux frees a virtio-gpu buffer's pages only when the device answers its RESOURCE_UNREF
(virtio_gpu_free_object -> unref callback -> virtio_gpu_cleanup_object): the guest's
Shmem returning to its starting level proves every UNREF was answered, and a leak in the
guest's use of the device shows the same way.
"""

from __future__ import annotations

import time

import numpy as np
import pytest

from guest_tests import drm
from guest_tests import drm_checks as checks
from guest_tests.guest_helpers import Screendumps

CYCLES = 200
MODESET_EVERY = 40
#: edge sizes first, then random ones up to 2048x1536
EDGE_SIZES = ((1, 1), (64, 64), (8192, 1), (1, 4096), (1280, 800), (33, 17), (4096, 2048))
MAX_RANDOM = (2048, 1536)
SHMEM_SLACK_KB = 1024  # tmpfs and page-cache noise
SETTLE_TIMEOUT = 30.0

pytestmark = pytest.mark.usefixtures("steady_console")


def sizes() -> list[tuple[int, int]]:
    """CYCLES (width, height) pairs, reproducible."""
    rng = np.random.default_rng(200)
    random = zip(rng.integers(1, MAX_RANDOM[0] + 1, CYCLES).tolist(),
                 rng.integers(1, MAX_RANDOM[1] + 1, CYCLES).tolist(), strict=True)
    return [*EDGE_SIZES, *random][:CYCLES]


def steady_shmem() -> int:
    """Shmem (kB) once two readings a second apart agree (or SETTLE_TIMEOUT passed)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    last = checks.meminfo()["Shmem"]
    while True:
        time.sleep(1.0)
        shmem = checks.meminfo()["Shmem"]
        if shmem == last or time.monotonic() > deadline:
            return shmem
        last = shmem


def settled_shmem(limit_kb: int) -> int:
    """Shmem (kB) once it is at most ``limit_kb`` or SETTLE_TIMEOUT passed (the device
    answers UNREFs asynchronously)."""
    deadline = time.monotonic() + SETTLE_TIMEOUT
    while True:
        shmem = checks.meminfo()["Shmem"]
        if shmem <= limit_kb or time.monotonic() > deadline:
            return shmem
        time.sleep(0.25)


def framebuffer_count() -> int:
    """Framebuffers the DRM core knows (debugfs 'framebuffer')."""
    text = (checks.dri_debugfs() / "framebuffer").read_text()
    return sum(line.startswith("framebuffer[") for line in text.splitlines())


def one_cycle(card: drm.Card, width: int, height: int, stamp: int) -> int:
    """Create, map, write and read back, destroy; returns the buffer's size."""
    buffer = card.create_dumb(width, height)
    try:
        assert buffer.pitch >= width * 4 and buffer.size >= buffer.pitch * height
        words = np.array([stamp, ~stamp & 0xFFFFFFFF], np.uint32).tobytes()
        with buffer.mapped() as mapping:
            mapping[:8] = words
            mapping[buffer.size - 8:] = words
            assert mapping[:8] == words and mapping[buffer.size - 8:] == words
        return buffer.size
    finally:
        buffer.destroy()


def test_dumb_buffer_cycles_do_not_leak(screendump: Screendumps,
                                        kernel_log: checks.KernelLog) -> None:
    baseline_shmem = steady_shmem()
    baseline_fbs = framebuffer_count()
    display = drm.Display()
    shown: drm.Framebuffer | None = None
    total = 0
    try:
        width, height = display.size
        for cycle, (w, h) in enumerate(sizes()):
            total += one_cycle(display.card, w, h, stamp=cycle)
            if cycle % MODESET_EVERY == MODESET_EVERY - 1:
                picture = checks.random_rgb(height, width, seed=1000 + cycle)
                fb = display.framebuffer(picture)
                display.show(fb)
                if shown is not None:
                    shown.destroy()  # no longer on screen
                shown = fb
                checks.expect_screen(screendump, f"drm-cycles-{cycle + 1}", picture)
        assert framebuffer_count() == baseline_fbs + 1
    finally:
        display.close()  # frees the last shown framebuffer, restores the console

    shmem = settled_shmem(baseline_shmem + SHMEM_SLACK_KB)
    assert shmem <= baseline_shmem + SHMEM_SLACK_KB, (
        f"Shmem {baseline_shmem} kB -> {shmem} kB after {CYCLES} cycles of "
        f"{total // 2**20} MiB: buffers were not freed (RESOURCE_UNREF unanswered?)")
    assert framebuffer_count() == baseline_fbs
    checks.expect_screen(screendump, "drm-cycles-console", checks.read_fbdev_rgb("fb0"))
    assert not kernel_log.trouble()
