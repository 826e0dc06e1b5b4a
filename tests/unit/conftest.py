"""Fixtures of the in-process device tests."""

from __future__ import annotations

from collections.abc import Iterator

import pytest

from tests.unit.device_harness import DeviceHarness


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
