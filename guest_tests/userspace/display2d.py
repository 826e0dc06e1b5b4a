"""2D resources from userspace: a framebuffer in pinned pages, shown on the device's scanout.

This is the copy path every virtio-gpu back-end (QEMU's C reference too) serves:
RESOURCE_CREATE_2D, ATTACH_BACKING, TRANSFER_TO_HOST_2D (counted in
``DriverStats.transfer_bytes``), SET_SCANOUT, RESOURCE_FLUSH.
"""

from __future__ import annotations

from guest_tests.userspace.gpu import GpuResponse, VirtioGpu
from guest_tests.userspace.pinned import PinnedBuffer
from protocol.virtio_gpu import (
    ResourceAttachBacking,
    ResourceCreate2d,
    ResourceFlush,
    SetScanout,
    TransferToHost2d,
)
from protocol.virtio_gpu_codes import Cmd, Format, Resp

__all__ = ["Framebuffer2D"]


class Framebuffer2D:
    """A B8G8R8X8 2D resource of ``width`` x ``height`` backed by a pinned buffer."""

    def __init__(self, gpu: VirtioGpu, width: int, height: int) -> None:
        self.gpu, self.width, self.height = gpu, width, height
        self.buffer = PinnedBuffer(width * height * 4)
        self.resource_id = gpu.new_resource_id()
        gpu.command(Cmd.RESOURCE_CREATE_2D, ResourceCreate2d(
            self.resource_id, Format.B8G8R8X8_UNORM, width, height)).expect(
            Resp.OK_NODATA, "RESOURCE_CREATE_2D")
        entries = self.buffer.entry_bytes()
        gpu.command(Cmd.RESOURCE_ATTACH_BACKING,
                    ResourceAttachBacking(self.resource_id, len(entries) // 16),
                    payload=entries).expect(Resp.OK_NODATA, "RESOURCE_ATTACH_BACKING")

    def transfer(self) -> GpuResponse:
        """TRANSFER_TO_HOST_2D of the whole image (a copy: counted as transferred bytes)."""
        response = self.gpu.command(Cmd.TRANSFER_TO_HOST_2D, TransferToHost2d(
            0, 0, self.width, self.height, 0, self.resource_id))
        self.gpu.stats.transfer_bytes += self.width * self.height * 4
        return response

    def show(self, scanout: int = 0) -> GpuResponse:
        """SET_SCANOUT to the whole image, then RESOURCE_FLUSH."""
        self.gpu.command(Cmd.SET_SCANOUT, SetScanout(
            0, 0, self.width, self.height, scanout, self.resource_id)).expect(
            Resp.OK_NODATA, "SET_SCANOUT")
        return self.gpu.command(Cmd.RESOURCE_FLUSH, ResourceFlush(
            0, 0, self.width, self.height, self.resource_id))

    def close(self, scanout: int = 0) -> None:
        """Disable the scanout, unref, release the pages."""
        if self.gpu.arena is not None:
            self.gpu.command(Cmd.SET_SCANOUT, SetScanout(0, 0, 0, 0, scanout, 0))
            self.gpu.unref(self.resource_id)
        self.buffer.close()

