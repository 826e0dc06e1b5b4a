"""Fixtures of the in-process device and virtqueue tests."""

from __future__ import annotations

import signal
from collections.abc import Iterator

import pytest

from tests.unit.device_harness import DeviceHarness
from tests.unit.driver_ring import NUM, RAM_SIZE, DriverRing
from tests.unit.guest_ram import GuestRam


@pytest.fixture
def dev() -> Iterator[DeviceHarness]:
    """A 2D device without a display."""
    harness = DeviceHarness()
    yield harness
    assert harness.device.internal_errors == 0
    harness.close()


@pytest.fixture
def shown() -> Iterator[DeviceHarness]:
    """A 2D device with a display peer."""
    harness = DeviceHarness(display=True)
    yield harness
    assert harness.device.internal_errors == 0
    harness.close()


@pytest.fixture
def ram() -> Iterator[GuestRam]:
    """One region of RAM_SIZE bytes of guest RAM at guest-physical 0."""
    ram = GuestRam([(0, RAM_SIZE)])
    yield ram
    ram.close()


@pytest.fixture
def ring(ram: GuestRam) -> Iterator[DriverRing]:
    """A NUM-entry split ring at 0x1000 in ``ram``."""
    ring = DriverRing(ram, NUM, 0x1000)
    yield ring
    ring.close()


@pytest.fixture
def signals() -> Iterator[None]:
    """Restore the SIGTERM and SIGINT handlers run() installs."""
    handlers = {s: signal.getsignal(s) for s in (signal.SIGTERM, signal.SIGINT)}
    yield
    for signum, handler in handlers.items():
        signal.signal(signum, handler)
