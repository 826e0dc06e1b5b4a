"""QMP screendumps of a vhost-user-gpu display, and the PPM files QEMU writes."""

from __future__ import annotations

import asyncio
import re
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
from qemu.qmp import QMPClient

from .control import parse_fields
from .errors import HarnessError, HarnessTimeout
from .qemu import GPU_IDS

SCREENDUMP_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,100}$")
SCREENDUMP_FORMATS = ("ppm", "png")
SCREENDUMP_TIMEOUT = 30.0
MAX_HEADS = 16  # VIRTIO_GPU_MAX_SCANOUTS


def parse_head(fields: dict[str, str]) -> int | None:
    """The ``head=N`` of a request (0 when absent), or None when it is not 0..15."""
    try:
        head = int(fields.get("head", "0"))
    except ValueError:
        return None
    return head if 0 <= head < MAX_HEADS else None
PPM_HEADER_RE = re.compile(rb"^P6\s+(\d+)\s+(\d+)\s+(\d+)\s")


def parse_ppm(data: bytes) -> np.ndarray:
    """The pixels of a binary 8-bit PPM (what QEMU's screendump writes) as (H, W, 3) uint8."""
    header = PPM_HEADER_RE.match(data)
    if header is None or int(header.group(3)) != 255:
        raise ValueError("not an 8-bit binary PPM (P6, maxval 255)")
    width, height = int(header.group(1)), int(header.group(2))
    pixels = data[header.end():header.end() + width * height * 3]
    if len(pixels) != width * height * 3:
        raise ValueError(f"PPM {width}x{height} is truncated")
    return np.frombuffer(pixels, np.uint8).reshape(height, width, 3)


async def connect_qmp(socket: Path, timeout: float,
                      qemu_exited: Callable[[], bool]) -> QMPClient:
    """Connect to QEMU's QMP socket once QEMU has created it and greets.

    QEMU greets only once its main loop runs, i.e. after every device was realized: a
    back-end that never answers vhost-user ends here, in a timeout.
    """
    client = QMPClient("vgpu-vm-runner")
    deadline = time.monotonic() + timeout
    while True:
        if qemu_exited():
            raise HarnessError("QEMU exited before its QMP monitor answered")
        try:
            await asyncio.wait_for(client.connect(str(socket)),
                                   max(0.1, deadline - time.monotonic()))
            return client
        except Exception as error:  # qemu.qmp raises ConnectError wrapping OSError
            if time.monotonic() > deadline:
                raise HarnessTimeout(f"QEMU's QMP monitor did not answer within "
                                     f"{timeout:.0f} s (stuck realizing a device?)") from error
            await asyncio.sleep(0.05)


class Screendumper:
    """Takes screendumps into `directory`; serves the guest's `screendump` requests."""

    def __init__(self, qmp: QMPClient, directory: Path) -> None:
        self.qmp = qmp
        self.directory = directory
        self.directory.mkdir(parents=True, exist_ok=True)

    async def dump(self, path: Path, device: str = GPU_IDS[0], fmt: str = "ppm",
                   head: int = 0) -> Path:
        """Write the current picture of `device`'s output `head` to `path` (QEMU writes
        the file)."""
        arguments: dict[str, object] = {"filename": str(path), "device": device, "format": fmt}
        if head:
            arguments["head"] = head
        try:
            await asyncio.wait_for(self.qmp.execute("screendump", arguments),
                                   SCREENDUMP_TIMEOUT)
        except TimeoutError as error:
            raise HarnessTimeout(f"QMP screendump took over {SCREENDUMP_TIMEOUT:.0f} s") \
                from error
        return path

    async def handle_request(self, args: str) -> str:
        """`screendump NAME [device=gpu0] [head=0] [format=ppm|png]` -> `ok FILE`
        (relative to dir)."""
        name = (args.split(maxsplit=1) or [""])[0]
        fields = parse_fields(args)
        device, fmt = fields.get("device", GPU_IDS[0]), fields.get("format", "ppm")
        if not SCREENDUMP_NAME_RE.match(name):
            return f"error bad screendump name {name!r}"
        head = parse_head(fields)
        if device not in GPU_IDS or fmt not in SCREENDUMP_FORMATS or head is None:
            return (f"error device must be one of {GPU_IDS}, head 0..{MAX_HEADS - 1}, "
                    f"format one of {SCREENDUMP_FORMATS}")
        path = self.directory / f"{name}.{fmt}"
        try:
            await self.dump(path, device, fmt, head)
        except Exception as error:  # QMP errors and timeouts go back to the guest
            return f"error screendump failed: {error}"
        return f"ok {path.name}"
