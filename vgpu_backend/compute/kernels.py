"""The simulated GPU's kernels, run on guest memory through the GPU page table.

A buffer argument is a GPU virtual range; the page table resolves it to host runs
(see :mod:`.buffers`).  Elementwise kernels apply numpy to the views
:func:`~.buffers.blocks` hands out: zero-copy pieces of large runs, or staged blocks of
scattered pages; the Python work is per run or per 2 MiB block, never per element or
page.  A matrix multiply needs 2D operands: an operand made of several runs is staged
into engine scratch (the analogue of a GPU's on-chip tiles) and the count of staged
bytes is reported.
"""

from __future__ import annotations

import threading
import zlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vgpu_backend.compute.buffers import MAX_PIECE, Buffer, blocks, staging

__all__ = ["Cancelled", "KernelStats", "checksum_crc32", "copy", "fill_u32",
           "matmul_f32", "reduce_sum_f32", "saxpy_f32", "vadd_f32"]

I64 = npt.NDArray[np.int64]


#: multiply-adds of one matmul row block (cancellation is checked between blocks): the
#: target, and a cap that still allows blocks of 512 rows, below which BLAS loses speed
#: re-reading the right operand (8 rows of a 4096^2 product: 0.25x; 512 rows: 0.97x)
_MATMUL_BLOCK_MACS = 1 << 31
_MATMUL_MAX_BLOCK_MACS = 1 << 34  # ~0.2 s at 200 GFLOP/s
_MATMUL_GOOD_ROWS = 512
_scratch = threading.local()


class Cancelled(Exception):
    """The job was cancelled (device reset, disconnect): stop at once."""


@dataclass(slots=True)
class KernelStats:
    """What a kernel did (for results and the demo's summary), and its cancellation."""

    bytes_touched: int = 0
    staged_bytes: int = 0
    pieces: int = 0
    cancel: threading.Event | None = None

    def step(self) -> None:
        """Count a piece; raise :class:`Cancelled` if the job was cancelled."""
        self.pieces += 1
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled


def _scratch_f32(count: int) -> npt.NDArray[np.float32]:
    """A per-thread float32 scratch array of at least ``count`` elements."""
    buf: npt.NDArray[np.float32] | None = getattr(_scratch, "f32", None)
    if buf is None or buf.shape[0] < count:
        buf = np.empty(max(count, MAX_PIECE // 4), dtype=np.float32)
        _scratch.f32 = buf
    return buf[:count]


def fill_u32(dst: Buffer, count: int, value: int, stats: KernelStats) -> None:
    """``dst[i] = value`` for ``count`` 32-bit words."""
    for (d,) in blocks([dst], count * 4, read=[False], written=[True]):
        d.view("<u4")[:] = value & 0xFFFFFFFF
        stats.step()
    stats.bytes_touched += count * 4


def copy(dst: Buffer, src: Buffer, nbytes: int, stats: KernelStats) -> None:
    """``memmove(dst, src, nbytes)`` in GPU virtual space."""
    # an overlapping forward copy goes backwards, like memmove; each range's source is
    # read (or staged) before its destination is written
    for d, s in blocks([dst, src], nbytes, read=[False, True], written=[True, False],
                       reverse=dst.va > src.va):
        d[:] = s
        stats.step()
    stats.bytes_touched += 2 * nbytes


def vadd_f32(dst: Buffer, a: Buffer, b: Buffer, count: int, stats: KernelStats) -> None:
    """``dst = a + b`` over ``count`` float32."""
    for d, x, y in blocks([dst, a, b], count * 4, read=[False, True, True],
                          written=[True, False, False]):
        np.add(x.view("<f4"), y.view("<f4"), out=d.view("<f4"))
        stats.step()
    stats.bytes_touched += 3 * count * 4


def saxpy_f32(y: Buffer, x: Buffer, count: int, a: float, stats: KernelStats) -> None:
    """``y = a * x + y`` over ``count`` float32."""
    alpha = np.float32(a)
    for yv, xv in blocks([y, x], count * 4, written=[True, False]):
        ys, xs = yv.view("<f4"), xv.view("<f4")
        tmp = _scratch_f32(xs.shape[0])
        np.multiply(xs, alpha, out=tmp)
        np.add(ys, tmp, out=ys)
        stats.step()
    stats.bytes_touched += 3 * count * 4


def reduce_sum_f32(x: Buffer, count: int, out: Buffer, stats: KernelStats) -> float:
    """Sum of ``count`` float32 (accumulated in float64), stored as float32 at ``out``."""
    total = 0.0
    for (xv,) in blocks([x], count * 4):
        total += float(np.sum(xv.view("<f4"), dtype=np.float64))
        stats.step()
    out.scatter(np.frombuffer(np.float32(total).tobytes(), dtype=np.uint8))
    stats.bytes_touched += count * 4 + 4
    return total


def checksum_crc32(buf: Buffer, nbytes: int, stats: KernelStats) -> int:
    """CRC-32 (zlib's) of ``nbytes`` bytes."""
    crc = 0
    for (v,) in blocks([buf], nbytes):
        crc = zlib.crc32(v.data, crc)
        stats.step()
    stats.bytes_touched += nbytes
    return crc


def matmul_f32(c: Buffer, a: Buffer, b: Buffer, m: int, n: int, k: int,
               stats: KernelStats) -> None:
    """``c[m, n] = a[m, k] @ b[k, n]`` (float32, row major)."""
    def operand(buf: Buffer, slot: int, rows: int, cols: int) -> npt.NDArray[np.float32]:
        if buf.single:
            raw = buf.whole()
        else:  # BLAS wants each operand contiguous: stage scattered ones
            raw = buf.gather(staging(slot, buf.nbytes))
            stats.staged_bytes += buf.nbytes
        return raw.view("<f4").reshape(rows, cols)

    left, right = operand(a, 0, m, k), operand(b, 1, k, n)
    # the product goes straight into c only when c is one run that no operand shares:
    # row blocks written early must not change rows read later
    direct = c.single and not c.overlaps(a) and not c.overlaps(b)
    out = (c.whole() if direct else staging(2, c.nbytes)).view("<f4").reshape(m, n)
    row_macs = max(1, n * k)
    rows = max(1, _MATMUL_BLOCK_MACS // row_macs,
               min(_MATMUL_GOOD_ROWS, _MATMUL_MAX_BLOCK_MACS // row_macs))
    for r in range(0, m, rows):
        np.matmul(left[r:r + rows], right, out=out[r:r + rows])
        stats.step()
    if not direct:
        c.scatter(out.view(np.uint8).reshape(-1))
        stats.staged_bytes += c.nbytes
    stats.bytes_touched += a.nbytes + b.nbytes + c.nbytes
