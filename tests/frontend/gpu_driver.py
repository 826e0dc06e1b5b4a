"""A virtio-gpu guest driver on top of the split-queue drivers.

Each command is laid out like Linux does it: the command struct in one device-readable
buffer, variable data (mem entries) in a second one, the response in a device-writable
buffer that is poisoned first (so a response the device never wrote is visible).
Chains are direct or INDIRECT; many commands can share one kick.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from protocol.virtio_gpu_codes import Cmd, Format, Resp
from tests.frontend import gpu_commands as cmds
from tests.frontend.gpu_commands import Fence, GpuResponse, Rect
from tests.frontend.guest_ram import PAGE_SIZE, GuestRam, Segment
from tests.frontend.virtqueue_driver import Completion, SplitQueueDriver

__all__ = ["POISON", "GpuDriver", "GuestImage", "PreparedCommand", "coalesce"]

POISON = 0xA5


def coalesce(segments: Sequence[Segment]) -> list[Segment]:
    """Merge guest-physically adjacent segments (what the Linux driver does)."""
    out: list[Segment] = []
    for seg in segments:
        if out and out[-1].gpa + out[-1].length == seg.gpa:
            out[-1] = Segment(out[-1].gpa, out[-1].length + seg.length)
        else:
            out.append(seg)
    return out


@dataclass(slots=True)
class GuestImage:
    """A 2D resource and its guest-side backing pages (linear, stride = width*4)."""

    resource_id: int
    fmt: int
    width: int
    height: int
    backing: list[Segment]

    @property
    def stride(self) -> int:
        """Bytes per row in the backing."""
        return self.width * 4

    def write(self, ram: GuestRam, offset: int, data: bytes | npt.NDArray[np.uint8]) -> None:
        """Write ``data`` at byte ``offset`` of the backing (scatter over its entries)."""
        buf = (np.ascontiguousarray(data).data if isinstance(data, np.ndarray)
               else memoryview(data)).cast("B")
        pos = 0
        for seg in self.backing:
            if offset >= seg.length:
                offset -= seg.length
                continue
            n = min(seg.length - offset, len(buf) - pos)
            ram.write(seg.gpa + offset, buf[pos:pos + n])
            pos += n
            offset = 0
            if pos == len(buf):
                return
        if pos < len(buf):
            raise ValueError("write past the end of the backing")

    def write_pixels(self, ram: GuestRam, pixels: npt.NDArray[np.uint8]) -> None:
        """Write a full ``(height, width, 4)`` image in the resource's byte order."""
        if pixels.shape != (self.height, self.width, 4):
            raise ValueError(f"pixels of shape {pixels.shape} for {self.width}x{self.height}")
        self.write(ram, 0, pixels)


@dataclass(slots=True)
class PreparedCommand:
    """A command laid out in guest RAM, ready to be queued."""

    out: list[Segment]
    response: Segment | None
    allocations: list[Segment] = field(default_factory=list)


class GpuDriver:
    """Guest driver for the control and cursor queues.

    :param indirect: use INDIRECT descriptors for every chain (Linux does when
        VIRTIO_RING_F_INDIRECT_DESC is negotiated).
    """

    def __init__(self, ram: GuestRam, ctrl: SplitQueueDriver, cursor: SplitQueueDriver, *,
                 indirect: bool = False, timeout: float = 5.0) -> None:
        self.ram = ram
        self.ctrl = ctrl
        self.cursor_queue = cursor
        self.indirect = indirect
        self.timeout = timeout
        self._ids = itertools.count(1)

    def new_resource_id(self) -> int:
        """A resource id not used by this driver before."""
        return next(self._ids)

    # --- layout and submission ---------------------------------------------------------

    def prepare(self, command: bytes, response_size: int | None = cmds.NODATA_RESP_SIZE, *,
                extra_out: bytes = b"", split_at: Sequence[int] = ()) -> PreparedCommand:
        """Place a command (and optional extra data) and a poisoned response buffer.

        ``split_at`` cuts the command bytes into several descriptors at those offsets.
        """
        resp = response_size or 0
        total = len(command) + len(extra_out) + resp
        base = self.ram.alloc_contiguous(max(total, 1))
        self.ram.write(base, command + extra_out)
        cuts = [0, *sorted(split_at), len(command)]
        out = [Segment(base + a, b - a) for a, b in itertools.pairwise(cuts) if b > a]
        if extra_out:
            out.append(Segment(base + len(command), len(extra_out)))
        response = None
        if response_size:
            response = Segment(base + len(command) + len(extra_out), response_size)
            self.ram.write(response.gpa, bytes([POISON]) * response_size)
        return PreparedCommand(out, response, [Segment(base, max(total, 1))])

    def submit(self, commands: Sequence[PreparedCommand], *, indirect: bool | None = None,
               timeout: float | None = None) -> list[GpuResponse]:
        """Queue all commands, kick once, wait for all; responses in submission order."""
        use_indirect = self.indirect if indirect is None else indirect
        heads = []
        for i, prepared in enumerate(commands):
            in_ = [prepared.response] if prepared.response else []
            heads.append(self.ctrl.add(prepared.out, in_, indirect=use_indirect, token=i))
        self.ctrl.submit()
        done = self.ctrl.wait_used(len(commands), timeout or self.timeout)
        by_token = {int(c.token): c for c in done if isinstance(c.token, int)}
        out = []
        for i, prepared in enumerate(commands):
            completion = by_token[i]
            raw = b""
            if prepared.response is not None:
                raw = self.ram.read(prepared.response.gpa, prepared.response.length)
            out.append(GpuResponse(raw, completion.length, completion.head))
            for alloc in prepared.allocations:
                self.ram.free(alloc.gpa, alloc.length)
        return out

    def run(self, command: bytes, response_size: int = cmds.NODATA_RESP_SIZE, *,
            extra_out: bytes = b"", indirect: bool | None = None,
            split_at: Sequence[int] = ()) -> GpuResponse:
        """One command, one kick, its response."""
        prepared = self.prepare(command, response_size, extra_out=extra_out, split_at=split_at)
        return self.submit([prepared], indirect=indirect)[0]

    def submit_raw(self, out: Sequence[Segment], in_: Sequence[Segment] = (), *,
                   indirect: bool = False, timeout: float | None = None) -> Completion:
        """A chain of arbitrary (possibly hostile) buffers; returns its used element."""
        self.ctrl.add(out, in_, indirect=indirect, token="raw")
        self.ctrl.submit()
        return self.ctrl.wait_used(1, timeout or self.timeout)[0]

    def cursor(self, command: bytes, *, timeout: float | None = None) -> Completion:
        """One command on the cursor queue (device-readable only, like Linux)."""
        base = self.ram.alloc_contiguous(len(command))
        self.ram.write(base, command)
        self.cursor_queue.add([Segment(base, len(command))], indirect=self.indirect)
        self.cursor_queue.submit()
        done = self.cursor_queue.wait_used(1, timeout or self.timeout)
        self.ram.free(base, len(command))
        return done[0]

    # --- commands --------------------------------------------------------------------

    def get_display_info(self, fence: Fence | None = None) -> GpuResponse:
        """GET_DISPLAY_INFO."""
        return self.run(cmds.get_display_info(fence), cmds.DISPLAY_INFO_RESP_SIZE)

    def get_edid(self, scanout: int, fence: Fence | None = None) -> GpuResponse:
        """GET_EDID."""
        return self.run(cmds.get_edid(scanout, fence), cmds.EDID_RESP_SIZE)

    def create_2d(self, resource_id: int, fmt: int, width: int, height: int,
                  fence: Fence | None = None) -> GpuResponse:
        """RESOURCE_CREATE_2D."""
        return self.run(cmds.resource_create_2d(resource_id, fmt, width, height, fence))

    def unref(self, resource_id: int, fence: Fence | None = None) -> GpuResponse:
        """RESOURCE_UNREF."""
        return self.run(cmds.resource_unref(resource_id, fence))

    def attach_backing(self, resource_id: int, entries: Sequence[Segment], *,
                       nr_entries: int | None = None, fence: Fence | None = None,
                       indirect: bool | None = None) -> GpuResponse:
        """RESOURCE_ATTACH_BACKING (``nr_entries`` may lie about the entry count)."""
        count = len(entries) if nr_entries is None else nr_entries
        return self.run(cmds.attach_backing(resource_id, count, fence),
                        extra_out=cmds.mem_entries(entries), indirect=indirect)

    def detach_backing(self, resource_id: int, fence: Fence | None = None) -> GpuResponse:
        """RESOURCE_DETACH_BACKING."""
        return self.run(cmds.detach_backing(resource_id, fence))

    def transfer(self, resource_id: int, rect: Rect, offset: int = 0,
                 fence: Fence | None = None) -> GpuResponse:
        """TRANSFER_TO_HOST_2D."""
        return self.run(cmds.transfer_to_host_2d(resource_id, rect, offset, fence))

    def set_scanout(self, scanout_id: int, resource_id: int, rect: Rect,
                    fence: Fence | None = None) -> GpuResponse:
        """SET_SCANOUT."""
        return self.run(cmds.set_scanout(scanout_id, resource_id, rect, fence))

    def flush(self, resource_id: int, rect: Rect, fence: Fence | None = None) -> GpuResponse:
        """RESOURCE_FLUSH."""
        return self.run(cmds.resource_flush(resource_id, rect, fence))

    def get_capset_info(self, index: int, fence: Fence | None = None) -> GpuResponse:
        """GET_CAPSET_INFO."""
        return self.run(cmds.get_capset_info(index, fence), cmds.CAPSET_INFO_RESP_SIZE)

    def get_capset(self, capset_id: int, version: int, response_size: int = 24,
                   fence: Fence | None = None) -> GpuResponse:
        """GET_CAPSET."""
        return self.run(cmds.get_capset(capset_id, version, fence), response_size)

    def update_cursor(self, scanout_id: int, x: int, y: int, *, resource_id: int,
                      hot_x: int = 0, hot_y: int = 0) -> Completion:
        """UPDATE_CURSOR on the cursor queue."""
        return self.cursor(cmds.cursor_command(Cmd.UPDATE_CURSOR, scanout_id, x, y,
                                               resource_id=resource_id, hot_x=hot_x,
                                               hot_y=hot_y))

    def move_cursor(self, scanout_id: int, x: int, y: int, *, resource_id: int = 1
                    ) -> Completion:
        """MOVE_CURSOR (``resource_id`` 0 hides the cursor)."""
        return self.cursor(cmds.cursor_command(Cmd.MOVE_CURSOR, scanout_id, x, y,
                                               resource_id=resource_id))

    # --- resources with backing ------------------------------------------------------------

    def alloc_backing(self, nbytes: int, *, scattered: bool = True,
                      regions: Sequence[int] | None = None) -> list[Segment]:
        """Guest pages for ``nbytes``: one entry per page when scattered, else one run."""
        if not scattered:
            region = None if regions is None else regions[0]
            return [Segment(self.ram.alloc_contiguous(nbytes, region=region), nbytes)]
        pages = -(-nbytes // PAGE_SIZE)
        gpas = self.ram.alloc_scattered(pages, regions=regions)
        last = nbytes - (pages - 1) * PAGE_SIZE
        return [Segment(g, PAGE_SIZE if i < pages - 1 else last) for i, g in enumerate(gpas)]

    def create_image(self, width: int, height: int, fmt: int = Format.B8G8R8X8_UNORM, *,
                     scattered: bool = True, regions: Sequence[int] | None = None,
                     resource_id: int | None = None) -> GuestImage:
        """RESOURCE_CREATE_2D + ATTACH_BACKING, both checked to succeed."""
        rid = self.new_resource_id() if resource_id is None else resource_id
        self.create_2d(rid, fmt, width, height).expect(Resp.OK_NODATA)
        backing = self.alloc_backing(width * height * 4, scattered=scattered, regions=regions)
        self.attach_backing(rid, backing).expect(Resp.OK_NODATA)
        return GuestImage(rid, fmt, width, height, backing)

    def show(self, image: GuestImage, scanout_id: int = 0) -> None:
        """TRANSFER + SET_SCANOUT + FLUSH of the whole image (what fbdev does)."""
        full = Rect(0, 0, image.width, image.height)
        self.transfer(image.resource_id, full).expect(Resp.OK_NODATA)
        self.set_scanout(scanout_id, image.resource_id, full).expect(Resp.OK_NODATA)
        self.flush(image.resource_id, full).expect(Resp.OK_NODATA)

    def free_backing(self, image: GuestImage) -> None:
        """Give the image's pages back to the allocator (after DETACH or UNREF)."""
        for seg in image.backing:
            self.ram.free(seg.gpa, seg.length)
