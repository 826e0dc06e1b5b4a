"""Fixtures for tests inside the scripts/vm.py guest.

* ``guest_env``: what the guest init exported; every fixture below skips (with the reason)
  when the tests do not run inside a vm.py guest.
* ``vgpu_backend``: "ours", "reference" or "custom", for skips that name the back-end.
* ``screendump``: ``screendump(name, device="gpu0") -> (H, W, 3) uint8``; the host takes a
  QMP screendump into the results directory; ``screendump.png(name)`` saves a PNG.
* ``framebuffer``: geometry of /dev/fb0 (the virtio-gpu fbdev).
* ``userspace_pci_address``: the --second-gpu device kept free for a userspace driver.
"""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from guest_tests.guest_helpers import ControlChannel, Framebuffer, GuestEnvironment, Screendumps

DRM_GPU_PCI = "0000:00:02.0"  # scripts/vmrunner/qemu.py places the DRM GPU here


@pytest.fixture(scope="session")
def guest_env() -> GuestEnvironment:
    """The guest environment; skips outside a vm.py guest."""
    env = GuestEnvironment.from_environ()
    if env is None:
        pytest.skip("not inside a scripts/vm.py guest (VGPU_RESULTS_DIR is unset)")
    return env


@pytest.fixture(scope="session")
def vgpu_backend(guest_env: GuestEnvironment) -> str:
    """Which back-end serves the GPU: "ours", "reference" or "custom"."""
    return guest_env.backend


@pytest.fixture(scope="session")
def control_channel(guest_env: GuestEnvironment) -> Iterator[ControlChannel]:
    """The open control port (one per session: the port allows a single opener)."""
    if not guest_env.control_port:
        pytest.skip("the org.vgpu.control virtio-serial port is missing")
    channel = ControlChannel(guest_env.control_port)
    yield channel
    channel.close()


@pytest.fixture(scope="session")
def screendump(control_channel: ControlChannel, guest_env: GuestEnvironment) -> Screendumps:
    """Call with a name to get the host's screendump of a display as (H, W, 3) uint8."""
    return Screendumps(control_channel, guest_env.results_dir)


@pytest.fixture(scope="session")
def framebuffer(guest_env: GuestEnvironment) -> Framebuffer:
    """Geometry of /dev/fb0; skips when the virtio-gpu fbdev is missing."""
    try:
        return Framebuffer.open("fb0")
    except FileNotFoundError:
        pytest.skip("no /dev/fb0: the virtio-gpu driver created no fbdev")


@pytest.fixture(scope="session")
def drm_pci_address() -> str:
    """PCI address of the GPU the guest kernel's virtio-gpu driver owns."""
    return DRM_GPU_PCI


@pytest.fixture(scope="session")
def userspace_pci_address(guest_env: GuestEnvironment) -> str:
    """PCI address of the second GPU, bound to no driver; skips without --second-gpu."""
    if not guest_env.userspace_pci:
        pytest.skip("no userspace-driver GPU: run `scripts/vm.py test --second-gpu`")
    return guest_env.userspace_pci
