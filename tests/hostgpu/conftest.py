"""Fixtures for the host GPU tests; every host GPU made here is checked for leaks
(mappings, BOs, simulated files, real fds) when the test ends."""

from __future__ import annotations

import itertools
import os
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from vgpu_backend.hostgpu.factory import HostGpuOptions, create_host_gpu
from vgpu_backend.hostgpu.kfd import KfdHostGpu
from vgpu_backend.hostgpu.sim_config import SimKfdConfig
from vgpu_backend.hostgpu.sim_kfd import SimTransport

from .helpers import GuestRam, MakeGpu, RawKfd, assert_no_new_fds, open_fds

_ram_names = itertools.count()


@pytest.fixture
def guest_ram() -> Iterator[GuestRam]:
    ram = GuestRam(256, f"guest-ram-{os.getpid()}-{next(_ram_names)}")
    yield ram
    ram.close()


@pytest.fixture
def make_gpu() -> Iterator[MakeGpu]:
    """Build sim host GPUs; at the end close them and check nothing leaked."""
    fds_before = open_fds()
    made: list[tuple[KfdHostGpu, SimTransport]] = []

    def make(sim: SimKfdConfig | None = None, *, transport: SimTransport | None = None,
             **options: Any) -> tuple[KfdHostGpu, SimTransport]:
        cfg = transport.kernel.config if transport is not None else sim or SimKfdConfig()
        transport = transport or SimTransport(cfg)
        gpu = create_host_gpu(HostGpuOptions(gpu="sim", sim=cfg, **options),
                              transport=transport)
        assert isinstance(gpu, KfdHostGpu)
        made.append((gpu, transport))
        return gpu, transport

    yield make
    for gpu, transport in made:
        gpu.close()
        assert gpu.live_mappings() == 0
        assert transport.kernel.live_bos() == 0
        assert transport.kernel.open_files() == []
        assert transport.kernel.userptr_charged == 0
    assert_no_new_fds(fds_before)


@pytest.fixture
def raw_kfd() -> Iterator[Callable[..., RawKfd]]:
    opened: list[RawKfd] = []

    def make(sim: SimKfdConfig | SimTransport | None = None) -> RawKfd:
        t = sim if isinstance(sim, SimTransport) else SimTransport(sim)
        raw = RawKfd(t)
        opened.append(raw)
        return raw

    yield make
    for raw in opened:
        raw.close()
