"""Fixtures for tests inside the scripts/vm.py guest.

* ``guest_env``: what the guest init exported; every fixture below skips (with the reason)
  when the tests do not run inside a vm.py guest.
* ``vgpu_backend``: "ours", "reference" or "custom", for skips that name the back-end.
* ``screendump``: ``screendump(name, device="gpu0") -> (H, W, 3) uint8``; the host takes a
  QMP screendump into the results directory; ``screendump.png(name)`` saves a PNG.
* ``framebuffer``: geometry of /dev/fb0 (the virtio-gpu fbdev).
* ``userspace_pci_address``: the --second-gpu device kept free for a userspace driver.
* DRM tests: ``steady_console`` (module scope: no blinking console cursor), ``display``
  (DRM master of card0), ``kernel_log`` (kernel messages logged during the test).
* userspace-driver tests: ``gpu`` (the shared driver, recovered after the test),
  ``pinned`` (a pool of pinned buffers; needs the userptr capset), ``compute`` (a
  compute context with a result blob; needs the compute capset).
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from guest_tests import drm
from guest_tests import drm_checks as checks
from guest_tests.guest_helpers import ControlChannel, Framebuffer, GuestEnvironment, Screendumps
from guest_tests.userspace.compute import ComputeContext
from guest_tests.userspace.gpu import VirtioGpu
from guest_tests.userspace.testing import (
    BufferPool,
    recover,
    require_compute,
    require_userptr,
    shared_gpu,
)

DRM_GPU_PCI = "0000:00:02.0"  # scripts/vmrunner/qemu.py places the DRM GPU here


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Outside a vm.py guest every test skips, with the reason, instead of failing on
    the host's devices."""
    if GuestEnvironment.from_environ() is not None:
        return
    skip = pytest.mark.skip(reason="not inside a scripts/vm.py guest (VGPU_RESULTS_DIR is "
                                   "unset): run `python3 scripts/vm.py test`")
    here = Path(__file__).parent
    for item in items:
        if item.path.is_relative_to(here):  # hooks see every item of the session
            item.add_marker(skip)


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


# --- the Linux DRM path ----------------------------------------------------------------


@pytest.fixture(scope="module")
def steady_console() -> Iterator[None]:
    """No blinking console cursor while a module's tests run (``usefixtures`` it)."""
    with checks.fbcon_cursor_blink(False):
        yield


@pytest.fixture
def display() -> Iterator[drm.Display]:
    """DRM master of card0; closed (console restored) after the test."""
    opened = drm.Display()
    yield opened
    opened.close()


@pytest.fixture
def kernel_log() -> Iterator[checks.KernelLog]:
    """Kernel messages logged during the test."""
    log = checks.KernelLog()
    yield log
    log.close()


# --- the userspace driver on the second GPU -------------------------------------------


@pytest.fixture
def gpu(userspace_pci_address: str) -> Iterator[VirtioGpu]:
    """The shared driver, recovered after the test if it left the device unusable."""
    driver = shared_gpu(userspace_pci_address)
    yield driver
    recover(driver)


@pytest.fixture
def pinned(gpu: VirtioGpu, vgpu_backend: str) -> Iterator[BufferPool]:
    """Pinned buffers for the test (skips without the userptr capset)."""
    require_userptr(gpu, vgpu_backend)
    pool = BufferPool(gpu)
    yield pool
    pool.close()


@pytest.fixture
def compute(gpu: VirtioGpu, pinned: BufferPool, vgpu_backend: str,
            request: pytest.FixtureRequest) -> Iterator[ComputeContext]:
    """A compute context with a result blob (closed before the test's buffers); skips
    without the compute capset."""
    capsets = require_compute(gpu, vgpu_backend)
    assert capsets.compute_id is not None
    context = ComputeContext(gpu, capsets.compute_id, request.module.__name__.rsplit(".")[-1])
    yield context
    context.close()
