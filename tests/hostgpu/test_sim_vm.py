"""The simulated page table: resolve() against a page-by-page reference model."""

from __future__ import annotations

import itertools

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vgpu_backend.hostgpu.base import GpuFault
from vgpu_backend.hostgpu.sim_vm import SimBo, SimGpuVm

PAGE = 4096
BASE = 1 << 32


def make_bo(handle: int, va: int, host_pages: list[int], counts: list[int], *,
            writable: bool = True) -> SimBo:
    starts = np.array(host_pages, dtype=np.int64) * PAGE + (1 << 40)
    sizes = np.array(counts, dtype=np.int64) * PAGE
    return SimBo(handle=handle, gpu_id=1, va=va, size=int(sizes.sum()), flags=0,
                 writable=writable, host_starts=starts, host_sizes=sizes,
                 charged=0, mmap_offset=0)


def host(page: int) -> int:
    return (1 << 40) + page * PAGE


def test_resolve_clips_merges_and_faults() -> None:
    vm = SimGpuVm(1, BASE, (1 << 47) - 1)
    vm.map(make_bo(1, BASE, [10, 11, 5], [1, 1, 2]))            # host 10,11 contiguous
    vm.map(make_bo(2, BASE + 4 * PAGE, [7], [1]))              # host 7 follows host 5,6
    vm.map(make_bo(3, BASE + 9 * PAGE, [50], [1], writable=False))
    assert vm.resolve(BASE, 5 * PAGE, write=True) == [(host(10), 2 * PAGE),
                                                      (host(5), 3 * PAGE)]
    assert vm.resolve(BASE + PAGE + 100, 2 * PAGE, write=False) == [
        (host(11) + 100, PAGE - 100), (host(5), PAGE + 100)]
    assert vm.resolve(BASE + 3, 0, write=True) == []
    with pytest.raises(GpuFault) as exc:
        vm.resolve(BASE + 4 * PAGE, 2 * PAGE, write=False)   # runs past BO 2 into a hole
    assert exc.value.address == BASE + 5 * PAGE and not exc.value.write
    with pytest.raises(GpuFault) as exc:
        vm.resolve(BASE - PAGE, 2 * PAGE, write=False)       # starts before everything
    assert exc.value.address == BASE - PAGE
    assert vm.resolve(BASE + 9 * PAGE, PAGE, write=False) == [(host(50), PAGE)]
    with pytest.raises(GpuFault, match="read-only") as exc:
        vm.resolve(BASE + 9 * PAGE + 8, 8, write=True)
    assert exc.value.address == BASE + 9 * PAGE + 8 and exc.value.write
    with pytest.raises(ValueError, match="negative"):
        vm.resolve(BASE, -1, write=False)


def test_unmap_and_invalidate_update_the_table() -> None:
    vm = SimGpuVm(1, BASE, (1 << 47) - 1)
    bo = make_bo(1, BASE, [3], [2])
    vm.map(bo)
    assert vm.resolve(BASE, PAGE, write=True) == [(host(3), PAGE)]
    bo.invalid = True
    vm.changed()
    with pytest.raises(GpuFault, match="invalidated"):
        vm.resolve(BASE + PAGE, 1, write=False)
    vm.unmap(bo)
    with pytest.raises(GpuFault, match="not mapped"):
        vm.resolve(BASE, 1, write=False)
    assert len(vm) == 0


@st.composite
def layouts(draw: st.DrawFn) -> tuple[list[tuple[int, list[int], list[int], int]], int, int]:
    """BOs as (gpu page, host pages, counts, gap after) plus a window (page-granular
    start and byte length)."""
    bos = []
    gpu_page = 0
    for _ in range(draw(st.integers(1, 5))):
        n = draw(st.integers(1, 6))
        hosts = draw(st.lists(st.integers(0, 60), min_size=n, max_size=n))
        counts = draw(st.lists(st.integers(1, 3), min_size=n, max_size=n))
        gap = draw(st.sampled_from([0, 0, 1]))
        bos.append((gpu_page, hosts, counts, gap))
        gpu_page += sum(counts) + gap
    start = draw(st.integers(0, gpu_page * PAGE - 1))
    length = draw(st.integers(1, gpu_page * PAGE - start + PAGE))
    return bos, start, length


@settings(max_examples=200, deadline=None)
@given(layouts())
def test_resolve_matches_a_byte_model(case: tuple[list[tuple[int, list[int], list[int], int]],
                                                  int, int]) -> None:
    bos, start, length = case
    vm = SimGpuVm(1, BASE, (1 << 47) - 1)
    page_map: dict[int, int] = {}   # GPU page -> host address of that page
    for i, (gpu_page, hosts, counts, _) in enumerate(bos):
        vm.map(make_bo(i + 1, BASE + gpu_page * PAGE, hosts, counts))
        p = gpu_page
        for h, c in zip(hosts, counts, strict=True):
            for k in range(c):
                page_map[p] = host(h + k)
                p += 1
    missing = [p for p in range(start // PAGE, (start + length - 1) // PAGE + 1)
               if p not in page_map]
    if missing:
        with pytest.raises(GpuFault) as exc:
            vm.resolve(BASE + start, length, write=False)
        assert exc.value.address == BASE + max(start, missing[0] * PAGE)
        return
    runs = vm.resolve(BASE + start, length, write=True)
    expected = np.array([page_map[a // PAGE] + a % PAGE for a in range(start, start + length)])
    got = np.concatenate([np.arange(a, a + n) for a, n in runs])
    assert np.array_equal(got, expected)
    # maximal runs: no two neighbours are host-contiguous
    assert all(a + n != b for (a, n), (b, _) in itertools.pairwise(runs))
