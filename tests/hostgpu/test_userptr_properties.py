"""Property: for random page-aligned range lists, what the GPU resolves is exactly the
ranges' memory, in order, on every path."""

from __future__ import annotations

import os
from collections.abc import Iterator

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from vgpu_backend.hostgpu.base import HostGpu
from vgpu_backend.hostgpu.factory import HostGpuOptions, create_host_gpu
from vgpu_backend.hostgpu.sim_config import SimKfdConfig
from vgpu_backend.hostgpu.sim_kfd import SimTransport

from .helpers import PAGE, GuestRam, assert_no_new_fds, maps_lines, open_fds, read_runs

RAM_PAGES = 128


@pytest.fixture(scope="module")
def ram() -> Iterator[GuestRam]:
    ram = GuestRam(RAM_PAGES, f"prop-ram-{os.getpid()}")
    yield ram
    ram.close()


@pytest.fixture(scope="module")
def gpus() -> Iterator[dict[str, tuple[HostGpu, SimTransport]]]:
    before = open_fds()
    out = {}
    for path in ("batch", "alias", "per-range"):
        cfg = SimKfdConfig(gpu_count=2)
        t = SimTransport(cfg)
        out[path] = (create_host_gpu(HostGpuOptions(gpu="sim", sim=cfg, userptr_path=path),
                                     transport=t), t)
    yield out
    for gpu, t in out.values():
        gpu.close()
        assert t.kernel.live_bos() == 0
    assert_no_new_fds(before)


range_lists = st.lists(st.tuples(st.integers(0, RAM_PAGES - 8), st.integers(1, 8)),
                       min_size=1, max_size=40)


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(spec=range_lists, path=st.sampled_from(["batch", "alias", "per-range"]),
       window=st.tuples(st.floats(0, 1), st.floats(0, 1)))
def test_resolve_covers_exactly_the_ranges_in_order(
        ram: GuestRam, gpus: dict[str, tuple[HostGpu, SimTransport]],
        spec: list[tuple[int, int]], path: str, window: tuple[float, float]) -> None:
    gpu, transport = gpus[path]
    ranges = ram.ranges([p for p, _ in spec], [c for _, c in spec])
    mapping = gpu.register_userptr(ranges, readonly=False)
    try:
        # expected host address of every byte, page by page
        pages = np.concatenate([np.arange(p, p + c) for p, c in spec])
        total = pages.size * PAGE
        assert mapping.size == total
        for gpu_id in mapping.gpu_ids:
            memory = gpu.gpu_memory(gpu_id)
            assert memory is not None
            runs = memory.resolve(mapping.gpu_va, total, write=True)
            assert sum(n for _, n in runs) == total
            if path != "alias":  # the host runs are guest RAM itself, page for page
                got = np.concatenate([np.arange(a, a + n, PAGE) for a, n in runs])
                assert np.array_equal(got, ram.base + pages * PAGE)
            # through zero-copy views: the file's bytes, in buffer order
            data = read_runs(runs)
            assert data == ram.file_bytes(ranges)
            lo = int(window[0] * (total - 1))
            size = max(1, int(window[1] * (total - lo)))
            sub = memory.resolve(mapping.gpu_va + lo, size, write=False)
            assert read_runs(sub) == data[lo:lo + size]
    finally:
        gpu.release(mapping)
    assert transport.kernel.live_bos() == 0
    assert maps_lines(ram.name) == 1
