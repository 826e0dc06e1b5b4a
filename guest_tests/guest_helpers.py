"""Guest-side helpers: the host control channel, screendumps and /dev/fb0 access.

Runs inside the scripts/vm.py guest under Debian's python3 (numpy 1.24, pytest 7.2).
"""

from __future__ import annotations

import json
import os
import re
import select
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import numpy.typing as npt

CONTROL_PORT_NAME = "org.vgpu.control"
PPM_HEADER_RE = re.compile(rb"^P6\s+(\d+)\s+(\d+)\s+(\d+)\s")
Image = npt.NDArray[np.uint8]


@dataclass(frozen=True)
class GuestEnvironment:
    """What the guest init exported (see guest_tests/boot/init)."""

    backend: str  # "ours", "reference" or "custom"
    results_dir: Path
    project_dir: Path
    control_port: str
    userspace_pci: str  # "" without --second-gpu

    def host_facts(self) -> dict[str, str]:
        """What the runner says the guest may expect of the host side (host.json in the
        results share: ``backend``, ``host_gpu`` = sim, kfd or unknown)."""
        path = self.results_dir / "host.json"
        facts: dict[str, str] = json.loads(path.read_text()) if path.exists() else {}
        return facts

    @classmethod
    def from_environ(cls) -> GuestEnvironment | None:
        """The environment, or None when not running inside a vm.py guest."""
        if not os.environ.get("VGPU_RESULTS_DIR"):
            return None
        return cls(
            backend=os.environ.get("VGPU_BACKEND", "unknown"),
            results_dir=Path(os.environ["VGPU_RESULTS_DIR"]),
            project_dir=Path(os.environ.get("VGPU_PROJECT_DIR", ".")),
            control_port=os.environ.get("VGPU_CONTROL_PORT") or find_control_port(),
            userspace_pci=os.environ.get("VGPU_USERSPACE_PCI", ""),
        )


def find_control_port() -> str:
    """The /dev node of the virtio-serial port named org.vgpu.control ("" if absent)."""
    for port in sorted(Path("/sys/class/virtio-ports").glob("*")):
        name = port / "name"
        if name.exists() and name.read_text().strip() == CONTROL_PORT_NAME:
            return f"/dev/{port.name}"
    return ""


class ControlChannel:
    """Request/reply lines to the host runner (scripts/vmrunner/control.py)."""

    def __init__(self, device: str) -> None:
        self.fd = os.open(device, os.O_RDWR | os.O_NOCTTY)
        self._pending = b""

    def request(self, line: str, timeout: float = 120.0) -> str:
        """Send one request line and return the host's reply line."""
        os.write(self.fd, line.encode() + b"\n")
        deadline = time.monotonic() + timeout
        while b"\n" not in self._pending:
            left = deadline - time.monotonic()
            if left <= 0 or not select.select([self.fd], [], [], left)[0]:
                raise TimeoutError(f"no reply from the host to {line!r} in {timeout} s")
            chunk = os.read(self.fd, 4096)
            if not chunk:
                raise ConnectionError("control port closed")
            self._pending += chunk
        reply, _, self._pending = self._pending.partition(b"\n")
        return reply.decode()

    def pause_vm(self, seconds: float = 0.5) -> None:
        """Have the host stop the VM (QMP ``stop``), wait ``seconds`` and continue it
        (``cont``); returns once the VM runs again (scripts/vmrunner/vmpause.py)."""
        reply = self.request(f"pause seconds={seconds:g}")
        if not reply.startswith("ok paused="):
            raise AssertionError(f"host pause failed: {reply}")

    def close(self) -> None:
        """Release the port (only one opener at a time is allowed)."""
        os.close(self.fd)


def parse_ppm(data: bytes) -> Image:
    """The pixels of a binary 8-bit PPM (QEMU's screendump format) as (H, W, 3) uint8."""
    header = PPM_HEADER_RE.match(data)
    if header is None or int(header.group(3)) != 255:
        raise ValueError("not an 8-bit binary PPM (P6, maxval 255)")
    width, height = int(header.group(1)), int(header.group(2))
    pixels = data[header.end():header.end() + width * height * 3]
    if len(pixels) != width * height * 3:
        raise ValueError(f"PPM {width}x{height} is truncated")
    return np.frombuffer(pixels, np.uint8).reshape(height, width, 3)


class Screendumps:
    """Asks the host for QMP screendumps of a display device and loads them."""

    def __init__(self, channel: ControlChannel, results_dir: Path) -> None:
        self.channel = channel
        self.directory = results_dir / "screendumps"

    def _take(self, name: str, device: str, fmt: str, head: int = 0) -> Path:
        reply = self.channel.request(
            f"screendump {name} device={device} head={head} format={fmt}")
        status, _, detail = reply.partition(" ")
        if status != "ok":
            raise RuntimeError(f"host screendump failed: {detail}")
        return self.directory / detail

    def __call__(self, name: str, device: str = "gpu0") -> Image:
        """The display of `device` ("gpu0" or "gpu1") now, as (H, W, 3) uint8 RGB."""
        return parse_ppm(self._take(name, device, "ppm").read_bytes())

    def png(self, name: str, device: str = "gpu0") -> Path:
        """Save the display as RESULTS/screendumps/NAME.png for people to look at."""
        return self._take(name, device, "png")

    def check(self, name: str, expected: Image, *, device: str = "gpu0", head: int = 0,
              x: int = 0, y: int = 0, whole: bool = True, timeout: float = 15.0) -> int:
        """Have the host check, pixel for pixel, that output ``head`` of the display
        shows ``expected`` at (x, y) (the whole display when ``whole``), screendumping
        until it does or ``timeout`` passes; the number of screendumps it took, or
        AssertionError with the host's account of what differs."""
        (self.directory / f"{name}.expected.ppm").write_bytes(ppm_bytes(expected))
        reply = self.channel.request(
            f"screencheck {name} device={device} head={head} x={x} y={y} "
            f"whole={int(whole)} timeout={timeout:g}", timeout=timeout + 60)
        status, _, detail = reply.partition(" ")
        if status != "ok":
            raise AssertionError(f"host pixel check: {detail}")
        return int(detail.rpartition("attempts=")[2])


def ppm_bytes(image: Image) -> bytes:
    """(H, W, 3) uint8 RGB as a binary 8-bit PPM."""
    height, width = image.shape[:2]
    return b"P6 %d %d 255\n" % (width, height) + np.ascontiguousarray(image, np.uint8).tobytes()


@dataclass(frozen=True)
class Framebuffer:
    """A Linux fbdev device's geometry (from sysfs)."""

    device: str
    name: str
    xres: int
    yres: int
    stride: int
    bits_per_pixel: int

    @classmethod
    def open(cls, name: str = "fb0") -> Framebuffer:
        """Geometry of /dev/`name`."""
        sysfs = Path("/sys/class/graphics") / name
        xres, yres = (int(v) for v in (sysfs / "virtual_size").read_text().split(","))
        return cls(f"/dev/{name}", (sysfs / "name").read_text().strip(), xres, yres,
                   int((sysfs / "stride").read_text()),
                   int((sysfs / "bits_per_pixel").read_text()))

    def write_rgb(self, x: int, y: int, rgb: Image) -> None:
        """Write `rgb` (H, W, 3) at (x, y) as XRGB8888, one pwrite per row."""
        if self.bits_per_pixel != 32:
            raise ValueError(f"{self.device} has {self.bits_per_pixel} bpp, not 32")
        height, width = rgb.shape[:2]
        if x + width > self.xres or y + height > self.yres:
            raise ValueError("region does not fit the framebuffer")
        bgrx = np.full((height, width, 4), 0xFF, np.uint8)
        bgrx[..., :3] = rgb[..., ::-1]
        fd = os.open(self.device, os.O_WRONLY)
        try:
            for row in range(height):
                os.pwrite(fd, bgrx[row].tobytes(), (y + row) * self.stride + x * 4)
        finally:
            os.close(fd)
