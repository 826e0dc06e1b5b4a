"""MATMUL_F32 on scattered buffers, in process: operands staged in the worker thread's
reused staging memory must never leak one dispatch's data into the next."""

from __future__ import annotations

import contextlib
from unittest import mock

import numpy as np
import numpy.typing as npt
import pytest

from vgpu_backend.compute import buffers, kernels
from vgpu_backend.compute.buffers import Buffer
from vgpu_backend.compute.kernels import KernelStats, matmul_f32

RUN = 4096
F32 = npt.NDArray[np.float32]
RNG = np.random.default_rng(77)


class ScatteredArena:
    """Host memory carved into 4 KiB runs handed out in a shuffled order, so a buffer's
    runs are neither contiguous nor ascending (what a guest's pinned pages look like)."""

    def __init__(self, runs: int) -> None:
        self.memory = np.zeros(runs * RUN, dtype=np.uint8)
        self.free = list(RNG.permutation(runs))

    def buffer(self, va: int, nbytes: int) -> Buffer:
        count = -(-nbytes // RUN)
        taken, self.free = self.free[:count], self.free[count:]
        addr = self.memory.ctypes.data + np.array(taken, dtype=np.int64) * RUN
        length = np.full(count, RUN, dtype=np.int64)
        length[-1] = nbytes - RUN * (count - 1)
        return Buffer(va, nbytes, addr, length)


def f32(buf: Buffer, values: npt.NDArray[np.float32]) -> None:
    buf.scatter(values.astype(np.float32).view(np.uint8).reshape(-1))


def matmul_operands(arena: ScatteredArena, m: int, n: int, k: int
                    ) -> tuple[F32, F32, Buffer, Buffer, Buffer]:
    """Random ``a`` (m x k) and ``b`` (k x n) written to scattered buffers, and a
    scattered buffer for ``c``."""
    a = RNG.standard_normal((m, k)).astype(np.float32)
    b = RNG.standard_normal((k, n)).astype(np.float32)
    abuf, bbuf = arena.buffer(0x10000, a.nbytes), arena.buffer(0x200000, b.nbytes)
    cbuf = arena.buffer(0x400000, m * n * 4)
    f32(abuf, a)
    f32(bbuf, b)
    return a, b, abuf, bbuf, cbuf


@pytest.mark.parametrize("cache_bytes", [buffers.STAGING_CACHE_BYTES, 64 * 1024, 0],
                         ids=["cached", "partly cached", "uncached"])
def test_consecutive_matmuls_of_other_shapes(cache_bytes: int) -> None:
    """Large, then small, then large again: staged slots are reused and resized."""
    arena = ScatteredArena(600)
    stats = KernelStats()
    with mock.patch.object(buffers, "STAGING_CACHE_BYTES", cache_bytes):
        for m, n, k in [(96, 80, 112), (7, 5, 3), (33, 130, 65), (96, 80, 112)]:
            a, b, abuf, bbuf, cbuf = matmul_operands(arena, m, n, k)
            f32(cbuf, np.full(m * n, np.nan, np.float32))
            matmul_f32(cbuf, abuf, bbuf, m, n, k, stats)
            got = cbuf.gather().view(np.float32).reshape(m, n)
            np.testing.assert_allclose(got, a @ b, rtol=1e-4, atol=1e-4)
    assert stats.staged_bytes > 0


def test_the_same_buffer_as_both_operands() -> None:
    """``c = a @ a``: one scattered buffer staged into two slots."""
    arena = ScatteredArena(64)
    a = RNG.standard_normal((40, 40)).astype(np.float32)
    abuf, cbuf = arena.buffer(0x1000, a.nbytes), arena.buffer(0x80000, a.nbytes)
    f32(abuf, a)
    matmul_f32(cbuf, abuf, abuf, 40, 40, 40, KernelStats())
    np.testing.assert_allclose(cbuf.gather().view(np.float32).reshape(40, 40), a @ a,
                               rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("shared", ["a", "b"])
@pytest.mark.parametrize("scattered", [False, True], ids=["one run", "scattered"])
def test_product_written_over_an_operand(shared: str, scattered: bool) -> None:
    """``c`` is the very memory of ``a`` or ``b``: the product of the old values."""
    arena = ScatteredArena(64)
    n = 96  # computed one row per block: in place, later rows would read overwritten ones
    a = RNG.standard_normal((n, n)).astype(np.float32)
    b = RNG.standard_normal((n, n)).astype(np.float32)
    if scattered:
        abuf, bbuf = arena.buffer(0x10000, a.nbytes), arena.buffer(0x90000, b.nbytes)
    else:
        base = arena.memory.ctypes.data
        length = np.array([a.nbytes], np.int64)
        abuf = Buffer(0x10000, a.nbytes, np.array([base], np.int64), length)
        bbuf = Buffer(0x90000, b.nbytes, np.array([base + a.nbytes], np.int64), length)
    f32(abuf, a)
    f32(bbuf, b)
    cbuf = abuf if shared == "a" else bbuf
    with mock.patch.object(kernels, "_MATMUL_BLOCK_MACS", n * n),\
            mock.patch.object(kernels, "_MATMUL_GOOD_ROWS", 1):  # one row per block
        matmul_f32(cbuf, abuf, bbuf, n, n, n, KernelStats())
    np.testing.assert_allclose(cbuf.gather().view(np.float32).reshape(n, n), a @ b,
                               rtol=1e-4, atol=1e-4)


#: m, n, k with 4 KiB runs and blocks of 3 rows: which operands are staged
IN_PLACE_CASES = {
    "16 rows per run": (64, 64, 64, "b"),
    "4+ rows per run": (48, 256, 128, "b"),
    "fewer rows per run of a than of c": (64, 64, 128, "b"),
    "a short last run": (50, 64, 64, "b"),
    "rows of a split across runs": (40, 64, 90, "ab"),
    "rows of c split across runs": (40, 90, 64, "bc"),
    "rows split across runs": (40, 70, 90, "abc"),
    "runs of a hold fewer rows than a block": (12, 64, 512, "ab"),
}


@pytest.mark.parametrize(("m", "n", "k", "staged"), list(IN_PLACE_CASES.values()),
                         ids=list(IN_PLACE_CASES))
def test_rows_in_one_run_are_used_in_place(m: int, n: int, k: int, staged: str) -> None:
    """When every run of ``a`` (or ``c``) holds whole rows, a block or more (but the
    last run), its row blocks are used in place; otherwise each row is staged once;
    ``b``, spread over several runs, is staged whole; the product is right either
    way."""
    arena = ScatteredArena(256)
    a, b, abuf, bbuf, cbuf = matmul_operands(arena, m, n, k)
    stats = KernelStats()
    with mock.patch.object(kernels, "_MATMUL_BLOCK_MACS", 1), \
            mock.patch.object(kernels, "_MATMUL_GOOD_ROWS", 3):  # blocks cut by runs, too
        matmul_f32(cbuf, abuf, bbuf, m, n, k, stats)
    np.testing.assert_allclose(cbuf.gather().view(np.float32).reshape(m, n), a @ b,
                               rtol=1e-4, atol=1e-4)
    sizes = {"a": abuf.nbytes, "b": bbuf.nbytes, "c": cbuf.nbytes}
    assert stats.staged_bytes == sum(sizes[name] for name in staged)


def test_operands_in_one_run_each_are_not_staged() -> None:
    """``a``, ``b`` and ``c`` each one host run: all used in place, nothing staged, so
    the staging limit does not apply."""
    m, n, k = 40, 24, 56
    memory = np.zeros(4 * (m * k + k * n + m * n), np.uint8)
    base = memory.ctypes.data
    sizes = [4 * m * k, 4 * k * n, 4 * m * n]
    starts = [base, base + sizes[0], base + sizes[0] + sizes[1]]
    abuf, bbuf, cbuf = (Buffer(0x10000 * (i + 1), size, np.array([start], np.int64),
                               np.array([size], np.int64))
                        for i, (start, size) in enumerate(zip(starts, sizes, strict=True)))
    a = RNG.standard_normal((m, k)).astype(np.float32)
    b = RNG.standard_normal((k, n)).astype(np.float32)
    f32(abuf, a)
    f32(bbuf, b)
    stats = KernelStats(max_staging=0)
    matmul_f32(cbuf, abuf, bbuf, m, n, k, stats)
    np.testing.assert_allclose(cbuf.gather().view(np.float32).reshape(m, n), a @ b,
                               rtol=1e-4, atol=1e-4)
    assert stats.staged_bytes == 0


@pytest.mark.parametrize("cap", ["multiply-adds", "bytes"])
def test_a_row_beyond_every_cap_is_a_block(cap: str) -> None:
    """A row with more multiply-adds, or more bytes, than a block may have is computed
    one row per block (never zero rows)."""
    arena = ScatteredArena(64)
    m, n, k = 9, 20, 30
    a, b, abuf, bbuf, cbuf = matmul_operands(arena, m, n, k)
    caps = {"_MATMUL_BLOCK_MACS": 1, "_MATMUL_MAX_BLOCK_MACS": 1} if cap == "multiply-adds" \
        else {"_MATMUL_BLOCK_BYTES": 4}
    stats = KernelStats()
    with contextlib.ExitStack() as patches:
        for name, value in caps.items():
            patches.enter_context(mock.patch.object(kernels, name, value))
        matmul_f32(cbuf, abuf, bbuf, m, n, k, stats)
    np.testing.assert_allclose(cbuf.gather().view(np.float32).reshape(m, n), a @ b,
                               rtol=1e-4, atol=1e-4)
    assert stats.pieces == m


@pytest.mark.parametrize(("m", "n", "k"), [(4, 3, 0), (4, 0, 5), (0, 3, 5), (0, 0, 0)])
def test_empty_dimensions(m: int, n: int, k: int) -> None:
    """An empty inner dimension gives zeros (a sum of no terms); an empty result writes
    nothing; neither is an error."""
    arena = ScatteredArena(8)
    abuf, bbuf = arena.buffer(0x1000, max(4, 4 * m * k)), arena.buffer(0x9000, max(4, 4 * k * n))
    cbuf = arena.buffer(0x20000, 4 * max(1, m * n))
    f32(cbuf, np.full(max(1, m * n), 7.0, np.float32))
    matmul_f32(cbuf, abuf, bbuf, m, n, k, KernelStats())
    got = cbuf.gather().view(np.float32)
    expected = np.zeros(m * n, np.float32) if m * n else np.full(1, 7.0, np.float32)
    np.testing.assert_array_equal(got[:expected.shape[0]], expected)


@pytest.mark.parametrize("shared", [False, True], ids=["b staged", "c over a"])
def test_operands_beyond_the_staging_limit_are_refused(shared: bool) -> None:
    """A scattered ``b`` (or a product written over an operand) is staged whole: beyond
    ``max_staging`` the kernel refuses before touching anything."""
    arena = ScatteredArena(64)
    a, b, abuf, bbuf, cbuf = matmul_operands(arena, 64, 32, 48)
    assert not bbuf.single
    target = abuf if shared else cbuf
    before = target.gather().copy()
    limit = (4 * 64 * 32 if shared else bbuf.nbytes) - 1  # c: 8 KiB, b: 6 KiB
    with pytest.raises(kernels.TooLarge, match="staging limit"):
        matmul_f32(target, abuf, bbuf, 64, 32, 48, KernelStats(max_staging=limit))
    assert np.array_equal(target.gather(), before)
    matmul_f32(target, abuf, bbuf, 64, 32, 48, KernelStats(max_staging=limit + 1))
    product = target.gather()[:4 * 64 * 32].view(np.float32).reshape(64, 32)
    np.testing.assert_allclose(product, a @ b, rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize(("n", "k"), [(2, 4096), (4096, 2)], ids=["rows of a", "rows of c"])
def test_row_blocks_are_bounded_in_bytes(n: int, k: int) -> None:
    """Wide rows of ``a`` or of ``c`` make fewer rows per staged block (never fewer than
    one)."""
    arena = ScatteredArena(300)
    m = 24  # wide rows: 16 KiB; the MAC targets alone would take all 24
    a, b, abuf, bbuf, cbuf = matmul_operands(arena, m, n, k)
    sizes: list[int] = []
    real = buffers.staging

    def spy(slot: int, nbytes: int) -> npt.NDArray[np.uint8]:
        sizes.append(nbytes)
        return real(slot, nbytes)
    with mock.patch.object(kernels, "_MATMUL_BLOCK_BYTES", 5 * 4 * max(n, k)), \
            mock.patch.object(kernels, "staging", spy):
        matmul_f32(cbuf, abuf, bbuf, m, n, k, KernelStats())
    np.testing.assert_allclose(cbuf.gather().view(np.float32).reshape(m, n), a @ b,
                               rtol=1e-3, atol=1e-3)
    assert max(s for s in sizes if s != bbuf.nbytes) <= 5 * 4 * max(n, k)


def test_a_job_past_its_deadline_stops_at_the_next_piece() -> None:
    arena = ScatteredArena(64)
    _, _, abuf, bbuf, cbuf = matmul_operands(arena, 16, 16, 16)
    with pytest.raises(kernels.OverTime):
        matmul_f32(cbuf, abuf, bbuf, 16, 16, 16, KernelStats(deadline=0.0))
