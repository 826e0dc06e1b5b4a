"""COPY between buffers that share host memory under other GPU VAs (two USERPTR blobs
over the same guest pages, a blob whose scatter list names a page twice), against a byte
model of memmove in GPU virtual space: all ``nbytes`` of the source are read (in VA
order), then written to the destination in VA order -- where the destination names one
host byte twice, the write at the higher VA wins."""

from __future__ import annotations

from unittest import mock

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from tests.compute.test_buffers import (
    U8,
    WALKS,
    Runs,
    aliasing_runs,
    arena,
    fill_random,
    make,
    odd_runs,
    page_runs,
    subrange,
)
from vgpu_backend.compute import buffers, kernels
from vgpu_backend.compute.buffers import PAGE
from vgpu_backend.compute.kernels import KernelStats, TooLarge, copy

__all__ = ["arena"]  # the fixture of test_buffers (a mapped host arena)

#: arena pages the blobs draw theirs from: few, so that they share pages often
POOL = 12
#: where the page table maps the two blobs (VA-disjoint, like two MAP_RESOURCEs)
BLOB_VA = (0x100000, 0x100000 + 64 * PAGE)
#: a copy of 3 MiB: more than one block (MAX_PIECE) of scattered pages
BIG = 768
Copy = tuple[Runs, int, Runs, int, int]  # dst runs, dst VA, src runs, src VA, bytes


def host_bytes(runs: Runs) -> npt.NDArray[np.int64]:
    """The arena offset of every buffer byte, in buffer (VA) order."""
    return np.concatenate([np.arange(a, a + n, dtype=np.int64) for a, n in runs])


def model_copy(memory: U8, dst: Runs, src: Runs, n: int) -> U8:
    """``memory`` after ``memmove(dst, src, n)`` in VA space: the source is read whole
    first; a host byte the destination names more than once gets its last write."""
    expected = memory.copy()
    data = memory[host_bytes(src)[:n]]
    targets = host_bytes(dst)[:n]
    _, from_end = np.unique(targets[::-1], return_index=True)  # each byte's last write
    last = n - 1 - from_end
    expected[targets[last]] = data[last]
    return expected


def page_list(pages: list[int] | npt.NDArray[np.int64]) -> Runs:
    """Runs of whole pages, in order (host-contiguous pages make one run)."""
    runs: Runs = []
    for page in (int(p) for p in pages):
        if runs and runs[-1][0] + runs[-1][1] == page * PAGE:
            runs[-1] = (runs[-1][0], runs[-1][1] + PAGE)
        else:
            runs.append((page * PAGE, PAGE))
    return runs


@st.composite
def blob_copies(draw: st.DrawFn) -> Copy:
    """A copy between byte ranges of two blobs (or within one) at the VAs the page table
    gives them; a blob is pool pages in any order, the same page possibly twice."""
    blobs = [page_list(draw(st.lists(st.integers(0, POOL - 1), min_size=1, max_size=10)))
             for _ in range(2)]
    d, s = draw(st.sampled_from([0, 1])), draw(st.sampled_from([0, 1]))
    d_size, s_size = (sum(n for _, n in blobs[k]) for k in (d, s))
    n = draw(st.integers(1, min(d_size, s_size)))
    d_lo, s_lo = draw(st.integers(0, d_size - n)), draw(st.integers(0, s_size - n))
    return (subrange(blobs[d], d_lo, d_lo + n), BLOB_VA[d] + d_lo,
            subrange(blobs[s], s_lo, s_lo + n), BLOB_VA[s] + s_lo, n)


@st.composite
def run_copies(draw: st.DrawFn) -> Copy:
    """A copy between arbitrary runs (nested, equal, shifted, odd) at arbitrary VAs: the
    VA ranges may overlap, even naming other host bytes at one VA."""
    dst, src = (draw(st.one_of(page_runs(8), odd_runs(), aliasing_runs())) for _ in "ds")
    n = min(sum(k for _, k in dst), sum(k for _, k in src))
    dst_va, src_va = (draw(st.integers(0x10000, 0x10000 + 8 * PAGE)) for _ in "ds")
    return subrange(dst, 0, n), dst_va, subrange(src, 0, n), src_va, n


@pytest.mark.parametrize("walk", WALKS)
@pytest.mark.parametrize("block", [PAGE, 3 * PAGE + 4, buffers.MAX_PIECE],
                         ids=["1 page", "odd", "default"])
@settings(max_examples=100, deadline=None)
@given(case=st.one_of(blob_copies(), run_copies()), seed=st.integers(0, 1000))
@example(case=(page_list([1, 2]), BLOB_VA[0], page_list([0, 1]), BLOB_VA[1], 2 * PAGE),
         seed=0)  # blobs a page apart
@example(case=(page_list([3, 4, 3]), BLOB_VA[1], page_list([5, 6, 7]), BLOB_VA[0],
               3 * PAGE), seed=0)  # a page named twice in the destination
@example(case=(page_list([3, 4, 3]), BLOB_VA[1], page_list([4, 5, 6]), BLOB_VA[0],
               3 * PAGE), seed=0)  # ... and a page shared with the source: staged whole
def test_copy_is_a_memmove_in_va_space(arena: U8, block: int, walk: str, case: Copy,
                                       seed: int) -> None:
    """Any aliasing, any walk, any block size (of walked and of staged copies): the byte
    model's result."""
    fill_random(arena, seed)
    dst_runs, dst_va, src_runs, src_va, n = case
    expected = model_copy(arena, dst_runs, src_runs, n)
    with mock.patch.object(buffers, "MAX_PIECE", block), \
            mock.patch.object(kernels, "MAX_PIECE", block), \
            mock.patch.object(buffers, "_STAGE_BELOW", WALKS[walk]):
        copy(make(arena, dst_runs, dst_va), make(arena, src_runs, src_va), n, KernelStats())
    assert np.array_equal(arena, expected)


@settings(max_examples=200, deadline=None)
@given(case=st.one_of(blob_copies(), run_copies()))
def test_same_mapping_matches_a_byte_model(arena: U8, case: Copy) -> None:
    """Both buffers are windows of one injective VA -> host map: a VA in both names the
    same host byte, and no host byte has two VAs."""
    dst_runs, dst_va, src_runs, src_va, _ = case
    pairs = {(dst_va + i, int(h)) for i, h in enumerate(host_bytes(dst_runs))} | \
        {(src_va + i, int(h)) for i, h in enumerate(host_bytes(src_runs))}
    expected = len(pairs) == len({v for v, _ in pairs}) == len({h for _, h in pairs})
    dst, src = make(arena, dst_runs, dst_va), make(arena, src_runs, src_va)
    assert dst.same_mapping(src) is expected
    assert src.same_mapping(dst) is expected


# --- realistic sizes, no patched block size: several 2 MiB blocks of 4 KiB pages ---------


def scattered(pages: int, seed: int) -> tuple[U8, npt.NDArray[np.int64]]:
    """Random host memory of ``pages`` pages, and its pages in a shuffled order (a
    guest's pinned pages)."""
    rng = np.random.default_rng(seed)
    return (rng.integers(0, 256, pages * PAGE, dtype=np.uint8),
            rng.permutation(pages).astype(np.int64))


@pytest.mark.parametrize("shift", [1, -1])
def test_blobs_over_one_guest_buffer_a_page_apart(shift: int) -> None:
    """Two blobs over one guest buffer, the destination starting a page later (+1) or
    earlier (-1) than the source; the VAs send a VA-ordered walk the wrong way (the
    destination's first writes land on source pages still to be read): the source is
    staged whole."""
    memory, guest = scattered(BIG + 1, 1)
    later, earlier = page_list(guest[1:]), page_list(guest[:-1])
    dst_runs, src_runs = (later, earlier) if shift > 0 else (earlier, later)
    dst_va, src_va = (BLOB_VA[0], BLOB_VA[1]) if shift > 0 else (BLOB_VA[1], BLOB_VA[0])
    n = BIG * PAGE
    expected = model_copy(memory, dst_runs, src_runs, n)
    stats = KernelStats()
    copy(make(memory, dst_runs, dst_va), make(memory, src_runs, src_va), n, stats)
    assert np.array_equal(memory, expected)
    assert stats.staged_bytes == n


def test_a_page_named_twice_in_the_destination_gets_its_last_write() -> None:
    """The destination's last page is its first one again (no page shared with the
    source): that page holds the last source page, whatever the VAs' order."""
    memory, pages = scattered(2 * BIG, 2)
    dst_pages = pages[:BIG].copy()
    dst_pages[-1] = dst_pages[0]
    dst_runs, src_runs = page_list(dst_pages), page_list(pages[BIG:])
    n = BIG * PAGE
    expected = model_copy(memory, dst_runs, src_runs, n)
    twice, last_src = int(dst_pages[0]) * PAGE, int(pages[-1]) * PAGE
    assert np.array_equal(expected[twice:twice + PAGE], memory[last_src:last_src + PAGE])
    stats = KernelStats()
    copy(make(memory, dst_runs, BLOB_VA[1]), make(memory, src_runs, BLOB_VA[0]), n, stats)
    assert np.array_equal(memory, expected)
    assert stats.staged_bytes == 0  # no byte shared with the source: walked as before


@pytest.mark.parametrize("forward", [True, False], ids=["forward", "backward"])
def test_a_large_overlapping_copy_within_one_buffer_is_not_staged(forward: bool) -> None:
    """memmove by 4099 bytes inside one scattered buffer of 4 MiB (one injective
    mapping): walked backwards or forwards block by block, nothing staged whole."""
    memory, pages = scattered(2 * BIG, 3)
    whole = page_list(pages)
    n, shift = BIG * PAGE, PAGE + 3
    dst_lo, src_lo = (shift, 0) if forward else (0, shift)
    dst_runs, src_runs = subrange(whole, dst_lo, dst_lo + n), subrange(whole, src_lo, src_lo + n)
    expected = model_copy(memory, dst_runs, src_runs, n)
    stats = KernelStats(max_staging=0)
    copy(make(memory, dst_runs, BLOB_VA[0] + dst_lo), make(memory, src_runs, BLOB_VA[0] + src_lo),
         n, stats)
    assert np.array_equal(memory, expected)
    assert stats.staged_bytes == 0


def test_a_copy_staged_beyond_the_staging_limit_is_refused() -> None:
    """A source that must be staged whole in more than ``max_staging`` bytes: TooLarge,
    nothing written; at the limit it is staged."""
    memory, guest = scattered(5, 4)
    dst_runs, src_runs = page_list(guest[1:]), page_list(guest[:-1])
    n = 4 * PAGE
    dst, src = make(memory, dst_runs, BLOB_VA[0]), make(memory, src_runs, BLOB_VA[1])
    before = memory.copy()
    with pytest.raises(TooLarge, match="staging limit"):
        copy(dst, src, n, KernelStats(max_staging=n - 1))
    assert np.array_equal(memory, before)
    expected = model_copy(memory, dst_runs, src_runs, n)
    stats = KernelStats(max_staging=n)
    copy(dst, src, n, stats)
    assert np.array_equal(memory, expected)
    assert stats.staged_bytes == n
