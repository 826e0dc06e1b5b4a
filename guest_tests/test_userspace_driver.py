"""The userspace virtio-gpu driver against the --second-gpu device: PCI, transport, rings.

These run against every back-end: they use only what QEMU's C reference serves too.
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from guest_tests.guest_helpers import Screendumps
from guest_tests.userspace.display2d import Framebuffer2D
from guest_tests.userspace.gpu import CURSOR_QUEUE, VirtioGpu, command_header
from guest_tests.userspace.pci import PciFunction, find_unbound_function
from guest_tests.userspace.testing import capsets_of, recover, shared_gpu, skip_unless_ours
from guest_tests.userspace.transport import CfgType, DeviceStatus, VirtioPciTransport
from protocol.capsets import DEFAULT_COMPUTE_CAPSET, DEFAULT_USERPTR_CAPSET
from protocol.virtio_gpu import ResourceCreate2d, ResourceUnref, UpdateCursor
from protocol.virtio_gpu_codes import Cmd, Feature, Format, Resp
from protocol.wire import encode


@pytest.fixture
def gpu(userspace_pci_address: str) -> Iterator[VirtioGpu]:
    """The shared driver, recovered after the test if it left the device unusable."""
    driver = shared_gpu(userspace_pci_address)
    yield driver
    recover(driver)


def test_pci_capabilities_describe_a_modern_virtio_gpu(userspace_pci_address: str) -> None:
    function = PciFunction(userspace_pci_address)
    assert (function.vendor, function.device) == (0x1AF4, 0x1050)
    assert function.driver is None
    caps = {cap.cfg_type: cap for cap, _ in function.virtio_capabilities()}
    for cfg_type in (CfgType.COMMON, CfgType.NOTIFY, CfgType.ISR, CfgType.DEVICE):
        assert cfg_type in caps, f"no {cfg_type.name} capability"
        cap = caps[cfg_type]
        bar_size = (function.sysfs / f"resource{cap.bar}").stat().st_size
        assert cap.offset + cap.length <= bar_size
    assert caps[CfgType.DEVICE].length >= 16  # struct virtio_gpu_config


def test_scan_finds_the_unbound_gpu(userspace_pci_address: str, drm_pci_address: str) -> None:
    """Without being told where, the scan over every PCI function finds the virtio-gpu
    the kernel driver does not own (the one the runner kept away from it), not the
    kernel's own GPU."""
    found = find_unbound_function(0x1AF4, 0x1050)
    assert found.address == userspace_pci_address
    with pytest.raises(FileNotFoundError, match="no unbound PCI function"):
        find_unbound_function(0x1AF4, 0x1050, preferred=drm_pci_address)


def test_bring_up_negotiates_features_and_queues(gpu: VirtioGpu) -> None:
    status = gpu.device_status
    assert status & DeviceStatus.DRIVER_OK and status & DeviceStatus.FEATURES_OK
    assert not status & (DeviceStatus.FAILED | DeviceStatus.NEEDS_RESET)
    assert gpu.features & Feature.VERSION_1
    assert gpu.features & ~gpu.offered_features == 0
    assert [ring.size for ring in gpu.rings] == [gpu.transport.queue_max_size(0),
                                                 gpu.transport.queue_max_size(1)]
    assert gpu.transport.command & 0x0006 == 0x0006  # memory space + bus master


def test_device_config_counts_scanouts_and_capsets(gpu: VirtioGpu, vgpu_backend: str) -> None:
    assert gpu.num_scanouts >= 1
    found = capsets_of(gpu)
    assert len(found.raw) == gpu.num_capsets
    if vgpu_backend == "ours":
        assert set(found.raw) == {DEFAULT_USERPTR_CAPSET, DEFAULT_COMPUTE_CAPSET}


def test_display_info_reports_an_enabled_scanout(gpu: VirtioGpu) -> None:
    modes = gpu.display_info()
    assert modes[0].enabled and modes[0].width > 0 and modes[0].height > 0
    assert not any(mode.enabled for mode in modes[gpu.num_scanouts:])


def test_an_indirect_chain_is_served(gpu: VirtioGpu) -> None:
    if not gpu.features & Feature.RING_INDIRECT_DESC:
        pytest.skip("the device did not offer VIRTIO_RING_F_INDIRECT_DESC")
    command = command_header(Cmd.RESOURCE_UNREF) + encode(ResourceUnref(0xDEAD01))
    response = gpu.call(command, indirect=True)
    assert response.name == Resp.ERR_INVALID_RESOURCE_ID.name


def test_a_full_ring_of_requests_completes_and_wraps(gpu: VirtioGpu) -> None:
    size = gpu.rings[0].size
    for _ in range(4):  # more than the ring size in total: the indexes wrap around slots
        command = command_header(Cmd.RESOURCE_UNREF) + encode(ResourceUnref(0xDEAD02))
        pending = [gpu.submit(command) for _ in range(size // 3)]
        answers = [gpu.wait(request).name for request in pending]
        assert answers == [Resp.ERR_INVALID_RESOURCE_ID.name] * len(pending)
    assert gpu.inflight == 0 and 4 * (size // 3) > size
    assert gpu.rings[0].free_descriptors == size


def test_cursor_queue_returns_its_buffers(gpu: VirtioGpu) -> None:
    command = command_header(Cmd.MOVE_CURSOR) + encode(UpdateCursor(0, 10, 20, 0, 0, 0, 0))
    response = gpu.call(command, response_size=0, queue=CURSOR_QUEUE)
    assert response.written == 0


def test_2d_framebuffer_reaches_the_second_display(gpu: VirtioGpu,
                                                   screendump: Screendumps) -> None:
    width, height = 160, 96
    pattern = np.random.default_rng(7).integers(0, 256, (height, width, 3), dtype=np.uint8)
    fb = Framebuffer2D(gpu, width, height)
    try:
        pixels = fb.buffer.data.reshape(height, width, 4)
        pixels[..., :3] = pattern[..., ::-1]  # B8G8R8X8: blue first in memory
        pixels[..., 3] = 0xFF
        assert fb.transfer().name == Resp.OK_NODATA.name
        assert fb.show().name == Resp.OK_NODATA.name
        screendump.check("userspace-2d", pattern, device="gpu1", whole=False)  # on the host
        assert screendump.png("userspace-2d", "gpu1").exists()
    finally:
        fb.close()


def test_reset_drops_resources_and_the_device_serves_again(gpu: VirtioGpu,
                                                           vgpu_backend: str) -> None:
    skip_unless_ours(vgpu_backend, "QEMU's C back-end never learns of a guest reset (no "
                     "RESET_DEVICE) and rejects the second display socket a bring-up causes")
    resource_id = gpu.new_resource_id()
    create = ResourceCreate2d(resource_id, Format.B8G8R8X8_UNORM, 64, 64)
    assert gpu.command(Cmd.RESOURCE_CREATE_2D, create).name == Resp.OK_NODATA.name
    assert gpu.command(Cmd.RESOURCE_CREATE_2D, create).name == \
        Resp.ERR_INVALID_RESOURCE_ID.name  # in use
    generation = gpu.generation
    gpu.reinitialize()
    assert gpu.generation == generation + 1
    assert gpu.command(Cmd.RESOURCE_CREATE_2D, create).name == Resp.OK_NODATA.name
    assert gpu.unref(resource_id).name == Resp.OK_NODATA.name


def test_a_second_transport_sees_the_running_device(gpu: VirtioGpu) -> None:
    other = VirtioPciTransport(gpu.function)
    try:
        assert other.status & DeviceStatus.DRIVER_OK
        assert other.num_queues >= 2
    finally:
        other.close()
