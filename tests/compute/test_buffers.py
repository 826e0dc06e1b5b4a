"""``Buffer`` and ``blocks`` against a byte model over a host arena: page-structured
runs (staged page by page) and arbitrary runs (walked run by run) must read and write
exactly the buffer's bytes, in either order, with any block size."""

from __future__ import annotations

from collections.abc import Iterator
from unittest import mock

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from vgpu_backend.compute import buffers
from vgpu_backend.compute.buffers import PAGE, Buffer, blocks
from vgpu_backend.compute.kernels import KernelStats, copy
from vgpu_backend.hostgpu import hostmem

ARENA_PAGES = 96
U8 = npt.NDArray[np.uint8]
Runs = list[tuple[int, int]]  # (arena offset, length)
#: how blocks() walks operands, forced: staged blocks or run-by-run pieces
WALKS = {"staged": 1 << 62, "runs": 0}


@pytest.fixture(scope="module")
def arena() -> Iterator[U8]:
    """Page-aligned host memory (an anonymous mapping, like guest RAM); unmapped after
    the module (views of it must not outlive it)."""
    addr = hostmem.map_anonymous(ARENA_PAGES * PAGE)
    yield hostmem.view(addr, ARENA_PAGES * PAGE)
    hostmem.unmap(addr, ARENA_PAGES * PAGE)


@st.composite
def page_runs(draw: st.DrawFn, max_pages: int = 24) -> Runs:
    """Runs as the GPU page table makes them: distinct arena pages grouped into runs
    of consecutive pages, the first starting at ``phase``, the last ending anywhere."""
    npages = draw(st.integers(1, max_pages))
    pages = draw(st.permutations(range(ARENA_PAGES)))[:npages]
    phase = draw(st.sampled_from([0, 0, 4, 16, PAGE - 4]))
    tail = draw(st.integers(1, PAGE))
    runs: Runs = []
    for k, page in enumerate(pages):
        start = page * PAGE + (phase if k == 0 else 0)
        end = page * PAGE + (tail if k == npages - 1 else PAGE)
        if k == 0 and npages == 1:
            end = max(end, start + 1)
        if runs and runs[-1][0] + runs[-1][1] == start:  # host-contiguous: one run
            runs[-1] = (runs[-1][0], runs[-1][1] + end - start)
        else:
            runs.append((start, end - start))
    return runs


@st.composite
def odd_runs(draw: st.DrawFn) -> Runs:
    """Runs with boundaries anywhere (not page-structured): walked run by run."""
    out: Runs = []
    used: set[int] = set()
    for _ in range(draw(st.integers(1, 6))):
        start = draw(st.integers(0, ARENA_PAGES * PAGE - 64))
        length = draw(st.integers(1, 64))
        if used & set(range(start, start + length)):
            continue
        used |= set(range(start, start + length))
        out.append((start, length))
    return out or [(5, 3)]


def make(arena: U8, runs: Runs, va: int = 0x10000) -> Buffer:
    base = arena.ctypes.data
    addr = np.array([base + a for a, _ in runs], dtype=np.int64)
    length = np.array([n for _, n in runs], dtype=np.int64)
    return Buffer(va, int(length.sum()), addr, length)


def model_bytes(arena: U8, runs: Runs) -> U8:
    return np.concatenate([arena[a:a + n] for a, n in runs])


def model_write(arena: U8, runs: Runs, lo: int, data: U8) -> None:
    """Write ``data`` at buffer byte ``lo``, byte by byte through the runs."""
    flat = np.concatenate([np.arange(a, a + n) for a, n in runs])
    arena[flat[lo:lo + data.shape[0]]] = data


def fill_random(arena: U8, seed: int) -> None:
    arena[:] = np.random.default_rng(seed).integers(0, 256, arena.shape[0], dtype=np.uint8)


@settings(max_examples=150, deadline=None)
@given(runs=st.one_of(page_runs(), odd_runs()), data=st.data())
def test_move_reads_and_writes_exactly_the_range(arena: U8, runs: Runs,
                                                 data: st.DataObject) -> None:
    fill_random(arena, data.draw(st.integers(0, 1000)))
    buf = make(arena, runs)
    assert np.array_equal(buf.gather(), model_bytes(arena, runs))
    lo = data.draw(st.integers(0, buf.nbytes - 1))
    hi = data.draw(st.integers(lo, buf.nbytes))
    got = np.empty(hi - lo, dtype=np.uint8)
    buf.move(lo, got, into_buffer=False)
    assert np.array_equal(got, model_bytes(arena, runs)[lo:hi])
    new = np.random.default_rng(hi).integers(0, 256, hi - lo, dtype=np.uint8)
    expected = arena.copy()
    model_write(expected, runs, lo, new)
    buf.move(lo, new, into_buffer=True)
    assert np.array_equal(arena, expected)  # nothing outside the range changed


def test_page_structure_is_recognised(arena: U8) -> None:
    assert make(arena, [(PAGE + 16, PAGE - 16), (7 * PAGE, 2 * PAGE), (3 * PAGE, 5)]
                ).page_structured
    assert not make(arena, [(PAGE + 16, PAGE - 32), (7 * PAGE, PAGE)]).page_structured
    assert not make(arena, [(PAGE, PAGE), (7 * PAGE + 8, PAGE)]).page_structured


@pytest.mark.parametrize("walk", WALKS)
@pytest.mark.parametrize("block", [PAGE, 3 * PAGE + 4, buffers.MAX_PIECE],
                         ids=["1 page", "odd", "default"])
@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_blocks_apply_an_elementwise_update(arena: U8, block: int, walk: str,
                                            data: st.DataObject) -> None:
    """y[i] = 3*x[i] + y[i] over bytes, x and y staged or walked, any block size."""
    fill_random(arena, data.draw(st.integers(0, 1000)))
    x_runs = data.draw(st.one_of(page_runs(12), odd_runs()))
    y_runs = data.draw(page_runs(12))
    if touched_pages(x_runs) & touched_pages(y_runs):
        return  # overlapping operands are the copy test's business
    x, y = make(arena, x_runs), make(arena, y_runs, va=0x900000)
    n = min(x.nbytes, y.nbytes)
    xs, ys = model_bytes(arena, x_runs)[:n], model_bytes(arena, y_runs)
    expected = arena.copy()
    model_write(expected, y_runs, 0, (3 * xs + ys[:n]).astype(np.uint8))
    reverse = data.draw(st.booleans())
    with mock.patch.object(buffers, "MAX_PIECE", block), \
            mock.patch.object(buffers, "_STAGE_BELOW", WALKS[walk]):
        for yv, xv in blocks([y, x], n, written=[True, False], reverse=reverse):
            yv[:] = 3 * xv + yv
    assert np.array_equal(arena, expected)


@settings(max_examples=60, deadline=None)
@given(runs=page_runs(16), data=st.data())
def test_write_only_blocks_are_not_gathered(arena: U8, runs: Runs, data: st.DataObject) -> None:
    """A write-only staged operand gets every byte written: stale staging never leaks."""
    fill_random(arena, data.draw(st.integers(0, 1000)))
    buf = make(arena, runs)
    expected = arena.copy()
    model_write(expected, runs, 0, np.full(buf.nbytes, 0xAB, np.uint8))
    with mock.patch.object(buffers, "MAX_PIECE", 2 * PAGE):
        for (view,) in blocks([buf], buf.nbytes, read=[False], written=[True]):
            view[:] = 0xAB
    assert np.array_equal(arena, expected)


def touched_pages(runs: Runs) -> set[int]:
    """Every page a run list touches (not only where each run starts)."""
    return {page for a, n in runs for page in range(a // PAGE, (a + n - 1) // PAGE + 1)}


def subrange(runs: Runs, lo: int, hi: int) -> Runs:
    """The runs of buffer bytes ``[lo, hi)``."""
    out, at = [], 0
    for a, n in runs:
        start, end = max(lo, at), min(hi, at + n)
        if start < end:
            out.append((a + start - at, end - start))
        at += n
    return out


@pytest.mark.parametrize("walk", WALKS)
@pytest.mark.parametrize("block", [PAGE, buffers.MAX_PIECE], ids=["1 page", "default"])
@settings(max_examples=80, deadline=None)
@given(runs=page_runs(20), data=st.data())
def test_copy_within_one_buffer_is_a_memmove(arena: U8, block: int, walk: str, runs: Runs,
                                             data: st.DataObject) -> None:
    """COPY between overlapping ranges of one scattered buffer, either direction."""
    fill_random(arena, data.draw(st.integers(0, 1000)))
    whole = model_bytes(arena, runs)
    total = whole.shape[0]
    n = data.draw(st.integers(1, total))
    src_lo, dst_lo = data.draw(st.integers(0, total - n)), data.draw(st.integers(0, total - n))
    src = make(arena, subrange(runs, src_lo, src_lo + n), va=0x10000 + src_lo)
    dst = make(arena, subrange(runs, dst_lo, dst_lo + n), va=0x10000 + dst_lo)
    expected = arena.copy()
    model_write(expected, runs, dst_lo, whole[src_lo:src_lo + n].copy())
    with mock.patch.object(buffers, "MAX_PIECE", block), \
            mock.patch.object(buffers, "_STAGE_BELOW", WALKS[walk]):
        copy(dst, src, n, KernelStats())
    assert np.array_equal(arena, expected)


@settings(max_examples=200, deadline=None)
@given(a=st.one_of(page_runs(8), odd_runs()), b=st.one_of(page_runs(8), odd_runs()))
def test_overlaps_matches_a_byte_model(arena: U8, a: Runs, b: Runs) -> None:
    bytes_a = {x for s, n in a for x in range(s, s + n)}
    bytes_b = {x for s, n in b for x in range(s, s + n)}
    expected = bool(bytes_a & bytes_b)
    assert make(arena, a).overlaps(make(arena, b)) is expected
    assert make(arena, b).overlaps(make(arena, a)) is expected
