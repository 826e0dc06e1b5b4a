"""What the DRM tests observe besides ioctls: the guest kernel's log, the driver's
debugfs files, /proc/meminfo, the fbdev console's pixels and the host's screendumps.

Runs inside the vm.py guest under Debian's python3 (numpy 1.24).
"""

from __future__ import annotations

import os
import re
import subprocess
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import numpy as np

from guest_tests.drm import Image
from guest_tests.guest_helpers import Screendumps

DEBUGFS = Path("/sys/kernel/debug")
#: driver trouble in kernel log lines (error responses are "*ERROR* response 0x12..")
TROUBLE_RE = re.compile(r"\*ERROR\*|WARNING:|BUG:|Oops|Call Trace|timed out|hung task")


def dri_debugfs(minor: int = 0) -> Path:
    """/sys/kernel/debug/dri/MINOR, mounting debugfs first if needed."""
    path = DEBUGFS / "dri" / str(minor)
    if not path.exists():
        subprocess.run(["mount", "-t", "debugfs", "debugfs", str(DEBUGFS)], check=True)
    return path


def debugfs_fields(name: str, minor: int = 0) -> dict[str, str]:
    """A ``key : value`` debugfs file of the driver (e.g. virtio-gpu-features)."""
    fields = {}
    for line in (dri_debugfs(minor) / name).read_text().splitlines():
        key, sep, value = line.partition(":")
        if sep:
            fields[key.strip()] = value.strip()
    return fields


def fence_ids(minor: int = 0) -> tuple[int, int]:
    """(last fence id the device completed, last fence id the driver emitted)."""
    words = (dri_debugfs(minor) / "virtio-gpu-irq-fence").read_text().split()
    return int(words[1]), int(words[2])


def meminfo() -> dict[str, int]:
    """/proc/meminfo in kB."""
    fields = {}
    for line in Path("/proc/meminfo").read_text().splitlines():
        key, _, value = line.partition(":")
        fields[key] = int(value.split()[0])
    return fields


def kernel_log_since_boot() -> list[str]:
    """Every message still in the kernel log buffer."""
    log = KernelLog(from_start=True)
    try:
        return log.read()
    finally:
        log.close()


class KernelLog:
    """Reads /dev/kmsg messages logged after it was opened (or all, ``from_start``)."""

    def __init__(self, from_start: bool = False) -> None:
        self.fd = os.open("/dev/kmsg", os.O_RDONLY | os.O_NONBLOCK)
        if not from_start:
            os.lseek(self.fd, 0, os.SEEK_END)

    def read(self) -> list[str]:
        """The messages that arrived since the last read."""
        lines: list[str] = []
        while True:
            try:
                record = os.read(self.fd, 8192)
            except BlockingIOError:
                return lines
            except BrokenPipeError:  # older records were overwritten: go on
                continue
            text = record.decode(errors="replace")
            lines.append(text.partition(";")[2].split("\n", 1)[0])

    def trouble(self) -> list[str]:
        """New messages that report driver errors, warnings or oopses."""
        return [line for line in self.read() if TROUBLE_RE.search(line)]

    def close(self) -> None:
        """Close /dev/kmsg."""
        os.close(self.fd)


@contextmanager
def fbcon_cursor_blink(enabled: bool) -> Iterator[None]:
    """Set fbcon's cursor blinking for the block, then restore it."""
    path = Path("/sys/class/graphics/fbcon/cursor_blink")
    if not path.exists():
        yield
        return
    saved = path.read_text().strip()
    path.write_text("1" if enabled else "0")
    try:
        yield
    finally:
        path.write_text(saved)


def read_fbdev_rgb(name: str = "fb0") -> Image:
    """The visible part of /dev/NAME (32 bpp XRGB8888) as (H, W, 3) RGB."""
    sysfs = Path("/sys/class/graphics") / name
    width, height = (int(v) for v in (sysfs / "virtual_size").read_text().split(","))
    stride = int((sysfs / "stride").read_text())
    data = Path("/dev", name).read_bytes()[:stride * height]
    rows = np.frombuffer(data, np.uint8).reshape(height, stride)[:, :width * 4]
    return np.ascontiguousarray(rows.reshape(height, width, 4)[..., 2::-1])


def random_rgb(height: int, width: int, seed: int) -> Image:
    """A reproducible (H, W, 3) noise picture (catches shifts, swaps and stale rows)."""
    return np.random.default_rng(seed).integers(0, 256, (height, width, 3), dtype=np.uint8)


def expect_screen(screendump: Screendumps, name: str, expected: Image,
                  timeout: float = 15.0) -> None:
    """The host screendumps until the whole display equals ``expected`` (checked pixel
    for pixel on the host); AssertionError naming the first wrong pixel otherwise."""
    screendump.check(name, expected, timeout=timeout)
