"""``Buffer`` and ``blocks`` against a byte model over a host arena: page-structured
runs (staged page by page) and arbitrary runs (walked run by run) must read and write
exactly the buffer's bytes, in either order, with any block size."""

from __future__ import annotations

import threading
from collections.abc import Iterator
from unittest import mock

import numpy as np
import numpy.typing as npt
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from vgpu_backend.compute import buffers
from vgpu_backend.compute.buffers import PAGE, Buffer, blocks, staging
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
def page_runs(draw: st.DrawFn, max_pages: int = 24, avoid: frozenset[int] = frozenset()
              ) -> Runs:
    """Runs as the GPU page table makes them: distinct arena pages (none in ``avoid``)
    grouped into runs of consecutive pages, the first starting at ``phase``, the last
    ending anywhere."""
    npages = draw(st.integers(1, max_pages))
    free = [page for page in range(ARENA_PAGES) if page not in avoid]
    pages = draw(st.permutations(free))[:npages]
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


@st.composite
def aliasing_runs(draw: st.DrawFn) -> Runs:
    """Runs that may share memory with each other (a page table mapping the same
    memory twice): some nested in others, some equal."""
    return draw(st.lists(st.tuples(st.integers(0, 16 * PAGE), st.integers(1, 3 * PAGE)),
                         min_size=1, max_size=6))


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
    """y[i] = 3*x[i] + y[i] over bytes, x and y staged or walked, any block size, the
    written operand first or second."""
    fill_random(arena, data.draw(st.integers(0, 1000)))
    x_runs = data.draw(st.one_of(page_runs(12), odd_runs()))
    # overlapping operands are the copy test's business
    y_runs = data.draw(page_runs(12, avoid=frozenset(touched_pages(x_runs))))
    x, y = make(arena, x_runs), make(arena, y_runs, va=0x900000)
    n = min(x.nbytes, y.nbytes)
    xs, ys = model_bytes(arena, x_runs)[:n], model_bytes(arena, y_runs)
    expected = arena.copy()
    model_write(expected, y_runs, 0, (3 * xs + ys[:n]).astype(np.uint8))
    reverse, y_at = data.draw(st.booleans()), data.draw(st.sampled_from([0, 1]))
    operands = [x, y] if y_at else [y, x]
    with mock.patch.object(buffers, "MAX_PIECE", block), \
            mock.patch.object(buffers, "_STAGE_BELOW", WALKS[walk]):
        for views in blocks(operands, n, written=[k == y_at for k in range(2)],
                            reverse=reverse):
            yv, xv = views[y_at], views[1 - y_at]
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
    real_move = Buffer.move
    gathered: list[int] = []

    def spy(self: Buffer, lo: int, flat: U8, *, into_buffer: bool) -> None:
        if not into_buffer:
            gathered.append(lo)
        real_move(self, lo, flat, into_buffer=into_buffer)
    with mock.patch.object(buffers, "MAX_PIECE", 2 * PAGE), \
            mock.patch.object(Buffer, "move", spy):
        for (view,) in blocks([buf], buf.nbytes, read=[False], written=[True]):
            view[:] = 0xAB
    assert np.array_equal(arena, expected)
    assert gathered == []  # nor read at all: the bytes would be overwritten anyway


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
@given(a=st.one_of(page_runs(8), odd_runs(), aliasing_runs()),
       b=st.one_of(page_runs(8), odd_runs(), aliasing_runs()))
@example(a=[(10 * PAGE, 3 * PAGE), (11 * PAGE, PAGE)], b=[(12 * PAGE + 100, 10)])
def test_overlaps_matches_a_byte_model(arena: U8, a: Runs, b: Runs) -> None:
    """Some host byte is in both run lists, for runs that may even overlap each other
    (a short run nested in a long one must not hide the long one's reach)."""
    bytes_a = {x for s, n in a for x in range(s, s + n)}
    bytes_b = {x for s, n in b for x in range(s, s + n)}
    expected = bool(bytes_a & bytes_b)
    assert make(arena, a).overlaps(make(arena, b)) is expected
    assert make(arena, b).overlaps(make(arena, a)) is expected


def test_moving_no_bytes_is_a_no_op(arena: U8) -> None:
    """An empty range anywhere in ``[0, nbytes]`` moves nothing and raises nothing, at
    the very end too (a buffer ending on a page boundary has no page there)."""
    fill_random(arena, 5)
    buf = make(arena, [(PAGE + 16, PAGE - 16), (7 * PAGE, 2 * PAGE), (3 * PAGE, PAGE)])
    assert buf.page_structured
    before = arena.copy()
    empty = np.empty(0, dtype=np.uint8)
    for lo in (0, 100, PAGE - 16, 3 * PAGE - 16, buf.nbytes):
        buf.move(lo, empty, into_buffer=False)
        buf.move(lo, empty, into_buffer=True)
    assert np.array_equal(arena, before)


def test_an_empty_buffer_overlaps_nothing(arena: U8) -> None:
    """A buffer of no runs shares memory with no buffer, either way round."""
    empty = Buffer(0x10000, 0, np.zeros(0, np.int64), np.zeros(0, np.int64))
    other = make(arena, [(PAGE, 2 * PAGE)])
    assert not empty.overlaps(other)
    assert not other.overlaps(empty)
    assert not empty.overlaps(empty)
    assert empty.gather().shape == (0,)


def test_run_at_is_the_run_exactly_when_one_run_holds_the_range(arena: U8) -> None:
    """``run_at(lo, hi)`` for every non-empty range, some reaching past the end: a view
    of the run's own memory when one run holds the whole range, else None."""
    fill_random(arena, 6)
    runs = [(PAGE + 16, 40), (7 * PAGE, 24), (3 * PAGE, 30)]
    buf = make(arena, runs)
    model = model_bytes(arena, runs)
    spans = [(int(end) - n, int(end)) for (_, n), end in
             zip(runs, np.cumsum([n for _, n in runs]), strict=True)]
    for lo in range(buf.nbytes + 2):
        for hi in range(lo + 1, buf.nbytes + 3):
            view = buf.run_at(lo, hi)
            if not any(start <= lo and hi <= end for start, end in spans):
                assert view is None, (lo, hi)
                continue
            assert view is not None, (lo, hi)
            assert np.array_equal(view, model[lo:hi]) and np.shares_memory(view, arena)


def test_walked_pieces_are_at_most_max_piece(arena: U8) -> None:
    """Runs longer than MAX_PIECE are walked in pieces cut at its multiples (a kernel's
    temporaries stay in cache, and its deadline is checked at least that often)."""
    x_runs = [(2 * PAGE, 5 * PAGE + 100)]
    y_runs = [(20 * PAGE, 2 * PAGE), (40 * PAGE, 3 * PAGE + 100)]
    fill_random(arena, 8)
    x, y = make(arena, x_runs), make(arena, y_runs, va=0x900000)
    with mock.patch.object(buffers, "MAX_PIECE", PAGE), \
            mock.patch.object(buffers, "_STAGE_BELOW", 0):
        pieces = [(xv.copy(), yv.copy()) for xv, yv in blocks([x, y], x.nbytes)]
    lengths = [xv.shape[0] for xv, _ in pieces]
    assert max(lengths) <= PAGE
    assert set(range(PAGE, x.nbytes, PAGE)) <= set(np.cumsum(lengths).tolist())
    assert np.array_equal(np.concatenate([xv for xv, _ in pieces]), model_bytes(arena, x_runs))
    assert np.array_equal(np.concatenate([yv for _, yv in pieces]), model_bytes(arena, y_runs))


@pytest.mark.parametrize("written", [None, [False]], ids=["default", "explicit"])
def test_operands_only_read_are_never_written(arena: U8, written: list[bool] | None) -> None:
    """A guest store into memory a kernel only reads, made while the kernel runs, is not
    undone by stale staged bytes written back (by default operands are not written)."""
    fill_random(arena, 9)
    runs = [(9 * PAGE + 16, PAGE - 16), (30 * PAGE, PAGE), (12 * PAGE, 2 * PAGE),
            (50 * PAGE, 300)]
    buf = make(arena, runs)
    flat = np.concatenate([np.arange(a, a + n) for a, n in runs])
    expected = arena.copy()
    expected[flat] = 0x5A
    done = 0
    with mock.patch.object(buffers, "MAX_PIECE", 2 * PAGE), \
            mock.patch.object(buffers, "_STAGE_BELOW", WALKS["staged"]):
        for (view,) in blocks([buf], buf.nbytes, written=written):
            arena[flat[done:done + view.shape[0]]] = 0x5A  # the guest's store
            done += view.shape[0]
    assert done == buf.nbytes
    assert np.array_equal(arena, expected)


def test_large_runs_are_walked_in_place_small_ones_staged(arena: U8) -> None:
    """Runs of at least _STAGE_BELOW bytes on average, or not page-structured, are walked
    run by run as zero-copy views; shorter page runs are staged in MAX_PIECE blocks, but
    an operand whose block lies in one run is used in place even then."""
    large = make(arena, [(10 * PAGE, 2 * PAGE), (40 * PAGE, 2 * PAGE), (20 * PAGE, 2 * PAGE)])
    small = make(arena, [(10 * PAGE, PAGE), (40 * PAGE, PAGE), (20 * PAGE, PAGE),
                         (60 * PAGE, PAGE), (70 * PAGE, PAGE), (80 * PAGE, PAGE)])
    odd = make(arena, [(5, 3), (100, 7), (PAGE + 9, 20)])
    one = make(arena, [(30 * PAGE, 6 * PAGE)])
    with mock.patch.object(buffers, "_STAGE_BELOW", 2 * PAGE):  # large: exactly this
        walked = [v for (v,) in blocks([large], large.nbytes)]
        staged = [v for (v,) in blocks([small], small.nbytes)]
        mixed = next(iter(blocks([small, one], small.nbytes)))
        odd_walked = [v for (v,) in blocks([odd], odd.nbytes)]
    assert [v.shape[0] for v in walked] == [2 * PAGE] * 3
    assert all(np.shares_memory(v, arena) for v in walked)
    assert [v.shape[0] for v in staged] == [small.nbytes]
    assert not np.shares_memory(staged[0], arena)
    assert not np.shares_memory(mixed[0], arena)
    assert np.shares_memory(mixed[1], arena)
    assert [v.shape[0] for v in odd_walked] == [3, 7, 20]
    assert all(np.shares_memory(v, arena) for v in odd_walked)


@pytest.fixture
def fresh_staging() -> Iterator[None]:
    """This thread's staging memory starts empty (other tests leave theirs cached)."""
    with mock.patch.object(buffers, "_scratch", threading.local()):
        yield


@pytest.mark.usefixtures("fresh_staging")
def test_staging_is_kept_between_calls() -> None:
    """A slot's memory is handed out again for the same or a smaller size, exactly as
    long as asked; other slots have their own."""
    first = staging(3, 1000)
    again, smaller = staging(3, 1000), staging(3, 10)
    assert first.shape == again.shape == (1000,)
    assert smaller.shape == (10,)
    assert np.shares_memory(first, again) and np.shares_memory(first, smaller)
    assert not np.shares_memory(first, staging(2, 1000))


@pytest.mark.usefixtures("fresh_staging")
def test_staging_cache_is_bounded() -> None:
    """Slots are kept while their total is at most STAGING_CACHE_BYTES; a request beyond
    it gets fresh memory every time and its slot keeps the old block."""
    with mock.patch.object(buffers, "STAGING_CACHE_BYTES", 10_000):
        a = staging(0, 6000)
        assert np.shares_memory(a, staging(0, 6000))
        b = staging(1, 4000)  # 6000 + 4000: exactly the limit
        assert np.shares_memory(b, staging(1, 4000))
        big = staging(1, 4001)
        assert not np.shares_memory(big, staging(1, 4001))
        assert np.shares_memory(b, staging(1, 4000))
        assert np.shares_memory(a, staging(0, 6000))


@pytest.mark.usefixtures("fresh_staging")
def test_a_growing_slot_does_not_count_its_old_block() -> None:
    """A slot grown within the limit replaces its old block, which is not counted
    against it."""
    with mock.patch.object(buffers, "STAGING_CACHE_BYTES", 10_000):
        staging(0, 6000)
        grown = staging(0, 8000)  # 8000 alone fits; 6000 + 8000 would not
        assert np.shares_memory(grown, staging(0, 8000))
        rest = staging(1, 2000)  # 8000 + 2000: the limit
        assert np.shares_memory(rest, staging(1, 2000))
        assert not np.shares_memory(staging(1, 2001), staging(1, 2001))


def test_staging_memory_is_per_thread(arena: U8) -> None:
    """Worker threads running kernels at once never share staging memory: neither
    staging() slots nor blocks()' staged blocks."""
    small = make(arena, [(10 * PAGE, PAGE), (40 * PAGE, PAGE), (20 * PAGE, 100)])

    def staged() -> list[U8]:
        with mock.patch.object(buffers, "_STAGE_BELOW", WALKS["staged"]):
            (block,) = next(iter(blocks([small], small.nbytes)))
        return [staging(0, 4096), block]
    mine = staged()
    theirs: list[U8] = []
    worker = threading.Thread(target=lambda: theirs.extend(staged()))
    worker.start()
    worker.join()
    assert len(theirs) == 2
    assert not any(np.shares_memory(m, t) for m, t in zip(mine, theirs, strict=True))
