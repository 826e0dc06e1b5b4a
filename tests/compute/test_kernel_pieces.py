"""Kernels piece by piece, in process on scattered host runs: every kernel checks the
job's deadline and cancellation after each piece, and sums and CRCs carry over from
one block to the next."""

from __future__ import annotations

import threading
import zlib
from collections.abc import Callable
from unittest import mock

import numpy as np
import pytest

from tests.compute.test_kernel_staging import RUN, ScatteredArena
from vgpu_backend.compute import buffers, kernels
from vgpu_backend.compute.buffers import Buffer
from vgpu_backend.compute.kernels import Cancelled, KernelStats, OverTime

NBYTES = 5 * RUN
Kernel = Callable[[KernelStats], object]


def kernel_calls(arena: ScatteredArena) -> dict[str, Kernel]:
    """Each kernel on scattered buffers of ``NBYTES`` (zeroed: no float overflow)."""
    x, y, z = (arena.buffer(0x100000 * (i + 1), NBYTES) for i in range(3))
    for buf in (x, y, z):
        buf.scatter(np.zeros(NBYTES, np.uint8))
    n = NBYTES // 4
    # a second buffer over x's runs under other VAs: a copy between them is staged whole
    alias = Buffer(0x900000, NBYTES - RUN, x.addr[1:], x.length[1:])
    a, b, c = (arena.buffer(0x800000 + i * 0x10000, 4 * 16 * 16) for i in range(3))
    for buf in (a, b):
        buf.scatter(np.zeros(4 * 16 * 16, np.uint8))
    return {
        "fill_u32": lambda s: kernels.fill_u32(x, n, 1, s),
        "copy": lambda s: kernels.copy(x, y, NBYTES, s),
        "copy staged": lambda s: kernels.copy(alias, x, NBYTES - RUN, s),
        "vadd_f32": lambda s: kernels.vadd_f32(x, y, z, n, s),
        "saxpy_f32": lambda s: kernels.saxpy_f32(x, y, n, 2.0, s),
        "reduce_sum_f32": lambda s: kernels.reduce_sum_f32(x, n, y, s),
        "checksum_crc32": lambda s: kernels.checksum_crc32(x, NBYTES, s),
        "matmul_f32": lambda s: kernels.matmul_f32(c, a, b, 16, 16, 16, s),
    }


NAMES = ["fill_u32", "copy", "copy staged", "vadd_f32", "saxpy_f32", "reduce_sum_f32",
         "checksum_crc32", "matmul_f32"]


def stopped_stats(stop: str) -> KernelStats:
    """Stats of a job past its deadline (``overtime``) or cancelled (``cancelled``)."""
    if stop == "overtime":
        return KernelStats(deadline=0.0)
    cancel = threading.Event()
    cancel.set()
    return KernelStats(cancel=cancel)


@pytest.mark.parametrize("name", NAMES)
@pytest.mark.parametrize("stop", ["overtime", "cancelled"])
def test_every_kernel_stops_after_a_piece(name: str, stop: str) -> None:
    """Each kernel checks after its first piece: past the deadline OverTime, cancelled
    Cancelled (not OverTime)."""
    call = kernel_calls(ScatteredArena(32))[name]
    stats = stopped_stats(stop)
    with pytest.raises(Cancelled) as raised:
        call(stats)
    assert isinstance(raised.value, OverTime) is (stop == "overtime")
    assert stats.pieces == 1


def test_a_staged_copy_stops_before_writing() -> None:
    """A copy staging its source whole checks the deadline after reading each piece:
    stopped, it has written nothing."""
    arena = ScatteredArena(8)
    src = arena.buffer(0x10000, 4 * RUN)
    memory = arena.memory
    alias = Buffer(0x80000, 3 * RUN, src.addr[1:], src.length[1:])
    memory[:] = np.random.default_rng(5).integers(0, 256, memory.shape[0], dtype=np.uint8)
    before = memory.copy()
    with mock.patch.object(kernels, "MAX_PIECE", RUN), pytest.raises(OverTime):
        kernels.copy(alias, src, 3 * RUN, KernelStats(deadline=0.0))
    assert np.array_equal(memory, before)


@pytest.mark.parametrize("piece", [RUN, 3 * RUN + 4], ids=["1 run", "odd"])
def test_sums_and_crcs_carry_over_blocks(piece: int) -> None:
    """REDUCE_SUM (float64 over all blocks) and CHECKSUM (zlib's running CRC) of a
    buffer walked in many blocks."""
    arena = ScatteredArena(24)
    n = 20 * RUN // 4
    values = np.random.default_rng(9).uniform(-1, 1, n).astype(np.float32)
    x, out = arena.buffer(0x10000, 4 * n), arena.buffer(0x900000, 4)
    x.scatter(values.view(np.uint8))
    stats = KernelStats()
    with mock.patch.object(buffers, "MAX_PIECE", piece):
        total = kernels.reduce_sum_f32(x, n, out, stats)
        crc = kernels.checksum_crc32(x, 4 * n, stats)
    assert stats.pieces >= 2 * (4 * n // piece)
    assert total == pytest.approx(float(np.sum(values, dtype=np.float64)), rel=1e-12)
    assert out.gather().view(np.float32)[0] == np.float32(total)
    assert crc == zlib.crc32(values.tobytes())
