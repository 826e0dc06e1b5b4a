"""What the guest_tests/test_userspace_*.py modules share: one driver per pytest process.

The driver is brought up once and shared by every module (each bring-up is a device
reset and a new display socket in QEMU; QEMU's C reference back-end cannot take a second
display socket).  After each test :func:`recover` re-initialises it if the test left a
request in flight or the device asks for a reset; the process exit resets the device
before the DMA pages go away.
"""

from __future__ import annotations

import atexit

import pytest

from guest_tests.userspace.compute import DeviceCapsets, discover_capsets
from guest_tests.userspace.gpu import DeviceTimeout, VirtioGpu
from guest_tests.userspace.pinned import PinnedBuffer
from guest_tests.userspace.transport import DeviceStatus

__all__ = ["OUR_BACKEND", "BufferPool", "capsets_of", "recover", "require_compute",
           "require_userptr", "shared_gpu", "skip_unless_ours"]

OUR_BACKEND = "ours"
_shared: dict[str, VirtioGpu] = {}
_capsets: dict[str, DeviceCapsets] = {}


def shared_gpu(address: str) -> VirtioGpu:
    """The process's driver for ``address`` (brought up on first use)."""
    gpu = _shared.get(address)
    if gpu is None or gpu.arena is None:
        gpu = _shared[address] = VirtioGpu(address)
        atexit.register(gpu.close)
    return gpu


def recover(gpu: VirtioGpu) -> None:
    """Re-initialise if a request is still in flight or the device is not running."""
    if gpu.arena is None:
        return
    gpu.poll()  # answers nobody waited for (unfenced submissions) are not "in flight"
    status = gpu.device_status
    if gpu.inflight or not status & DeviceStatus.DRIVER_OK or \
            status & (DeviceStatus.NEEDS_RESET | DeviceStatus.FAILED):
        gpu.reinitialize()
        _capsets.pop(gpu.function.address, None)


def capsets_of(gpu: VirtioGpu) -> DeviceCapsets:
    """The device's capsets (read once per bring-up)."""
    found = _capsets.get(gpu.function.address)
    if found is None:
        found = _capsets[gpu.function.address] = discover_capsets(gpu)
    return found


def skip_unless_ours(backend: str, reason: str) -> None:
    """Skip on any back-end but ours, naming it and the reason."""
    if backend != OUR_BACKEND:
        pytest.skip(f"back-end {backend!r}: {reason}")


def require_userptr(gpu: VirtioGpu, backend: str) -> DeviceCapsets:
    """The capsets; skips (other back-ends) or fails (ours) without the userptr capset."""
    found = capsets_of(gpu)
    if found.userptr is None:
        if backend == OUR_BACKEND:
            pytest.fail(f"our back-end publishes no userptr capset ({sorted(found.raw)})")
        pytest.skip(f"back-end {backend!r} publishes no userptr capset: no blob/USERPTR "
                    "resources (QEMU's C vhost-user-gpu is 2D only)")
    return found


def require_compute(gpu: VirtioGpu, backend: str) -> DeviceCapsets:
    """Like :func:`require_userptr`, and the compute capset must be there too."""
    found = require_userptr(gpu, backend)
    if found.compute is None:
        if backend == OUR_BACKEND:
            pytest.fail(f"our back-end publishes no compute capset ({sorted(found.raw)})")
        pytest.skip(f"back-end {backend!r} publishes no compute capset (no contexts)")
    return found


class BufferPool:
    """Pinned buffers for one test, released safely: blobs still using them are unref'd
    first, so the device never keeps a mapping of pages handed back to the kernel."""

    def __init__(self, gpu: VirtioGpu) -> None:
        self.gpu = gpu
        self.buffers: list[PinnedBuffer] = []

    def __call__(self, size: int, *, offset: int = 0, huge: bool = False) -> PinnedBuffer:
        """A new pinned buffer of ``size`` bytes starting ``offset`` bytes into a page."""
        buffer = PinnedBuffer(size, offset=offset, huge=huge)
        self.buffers.append(buffer)
        return buffer

    def close(self) -> None:
        """Unref the blobs of these buffers (if the device still has them), then free."""
        mine = {id(buffer) for buffer in self.buffers}
        if self.gpu.arena is not None:
            try:
                for blob in list(self.gpu.userptrs.values()):
                    if id(blob.buffer) in mine:
                        self.gpu.unref(blob.resource_id, timeout=10.0)
            except DeviceTimeout:
                self.gpu.reinitialize()  # the reset drops every blob
        for buffer in self.buffers:
            buffer.close()
        self.buffers.clear()
