"""End-to-end proof that the harness works: device, driver, fbdev and screendumps."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from guest_tests.guest_helpers import Framebuffer, Screendumps

VIRTIO_VENDOR = "0x1af4"
VIRTIO_GPU_DEVICE = "0x1050"  # modern virtio-pci id 0x1040 + device type 16 (GPU)


def _pci(address: str) -> Path:
    return Path("/sys/bus/pci/devices") / address


def test_virtio_gpu_driver_owns_the_display_device(drm_pci_address: str) -> None:
    device = _pci(drm_pci_address)
    assert (device / "vendor").read_text().strip() == VIRTIO_VENDOR
    assert (device / "device").read_text().strip() == VIRTIO_GPU_DEVICE
    assert (device / "driver").resolve().name == "virtio-pci"
    virtio_devices = list(device.glob("virtio[0-9]*"))
    assert len(virtio_devices) == 1, virtio_devices
    assert (virtio_devices[0] / "driver").resolve().name == "virtio_gpu"
    cards = [card for card in Path("/sys/class/drm").glob("card[0-9]")
             if (card / "device").resolve() == device.resolve()]
    assert cards, f"no DRM card on {drm_pci_address}"
    assert Path("/dev/dri", cards[0].name).exists()


def test_fb0_is_the_virtio_gpu_fbdev(framebuffer: Framebuffer) -> None:
    assert "virtio" in framebuffer.name, framebuffer.name
    assert Path(framebuffer.device).exists()
    assert framebuffer.bits_per_pixel == 32
    assert framebuffer.stride >= framebuffer.xres * 4


def test_hugepages_are_reserved() -> None:
    meminfo = dict(line.split(":", 1) for line in Path("/proc/meminfo").read_text().splitlines())
    assert int(meminfo["HugePages_Total"]) > 0
    assert int(meminfo["Hugepagesize"].split()[0]) == 2048


def test_framebuffer_pattern_reaches_the_screendump(framebuffer: Framebuffer,
                                                    screendump: Screendumps) -> None:
    pattern = np.random.default_rng(20240601).integers(0, 256, (96, 160, 3), dtype=np.uint8)
    x, y = framebuffer.xres // 3, framebuffer.yres // 3
    framebuffer.write_rgb(x, y, pattern)

    screendump.check("smoke-pattern", pattern, x=x, y=y, whole=False)  # on the host
    assert screendump("smoke-pattern").shape == (framebuffer.yres, framebuffer.xres, 3)
    assert screendump.png("smoke-pattern").exists()


def test_userspace_gpu_is_left_to_userspace(userspace_pci_address: str) -> None:
    device = _pci(userspace_pci_address)
    assert (device / "vendor").read_text().strip() == VIRTIO_VENDOR
    assert (device / "device").read_text().strip() == VIRTIO_GPU_DEVICE
    assert not (device / "driver").exists(), "a kernel driver is bound"
    assert (device / "driver_override").read_text().strip() == "none"
    assert (device / "resource4").exists(), "the virtio-pci modern BAR is not mappable"
