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

import itertools
import threading
import time
import zlib
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vgpu_backend.compute.buffers import MAX_PIECE, Buffer, blocks, staging

__all__ = ["Cancelled", "KernelStats", "OverTime", "TooLarge", "checksum_crc32", "copy",
           "fill_u32", "matmul_f32", "reduce_sum_f32", "saxpy_f32", "vadd_f32"]

I64 = npt.NDArray[np.int64]


#: multiply-adds of one matmul row block (cancellation is checked between blocks): the
#: target, and a cap that still allows blocks of 512 rows, below which BLAS loses speed
#: re-reading the right operand (8 rows of a 4096^2 product: 0.25x; 512 rows: 0.97x)
_MATMUL_BLOCK_MACS = 1 << 31
_MATMUL_MAX_BLOCK_MACS = 1 << 34  # ~0.2 s at 200 GFLOP/s
_MATMUL_GOOD_ROWS = 512
#: most bytes of one staged row block of ``a`` or ``c`` (a block has at least one row)
_MATMUL_BLOCK_BYTES = 64 << 20
_scratch = threading.local()


class Cancelled(Exception):
    """The job was cancelled (device reset, disconnect): stop at once."""


class OverTime(Cancelled):
    """The job ran past its time limit: stop at once."""


class TooLarge(Exception):
    """An operand would need more engine scratch than the staging limit."""


@dataclass(slots=True)
class KernelStats:
    """What a kernel did (the engine logs the bytes touched and staged per job), and
    its cancellation."""

    bytes_touched: int = 0
    staged_bytes: int = 0
    pieces: int = 0
    cancel: threading.Event | None = None
    #: ``time.monotonic()`` after which the job stops (:class:`OverTime`)
    deadline: float = float("inf")
    #: most bytes one operand may be staged in (:class:`TooLarge`)
    max_staging: int = 1 << 62

    def step(self) -> None:
        """Count a piece; raise :class:`Cancelled` if the job was cancelled or ran out
        of time."""
        self.pieces += 1
        if self.cancel is not None and self.cancel.is_set():
            raise Cancelled
        if time.monotonic() > self.deadline:
            raise OverTime


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
    """``memmove(dst, src, nbytes)`` in GPU virtual space: as if all ``nbytes`` of
    ``src`` were read, then written to ``dst`` in VA order -- where ``dst`` names a host
    byte more than once (a page mapped twice), its write at the highest VA wins.

    Operands in one mapping (:meth:`~.Buffer.same_mapping`) are walked range by range,
    an overlapping forward copy backwards, like memmove.  Operands sharing host memory
    under other VAs (two blobs over the same guest pages, a page listed twice in one)
    have no safe walking order: the source is staged whole (``stats.staged_bytes``).

    :raise TooLarge: the source would be staged whole in more than
        ``stats.max_staging`` bytes (nothing is written)."""
    shared = dst.overlaps(src)
    if shared and not dst.same_mapping(src):
        _copy_staged(dst, src, nbytes, stats)
    else:
        # each range's source is read (or staged) before its destination is written;
        # disjoint operands go forwards: a byte ``dst`` names twice gets its last write
        for d, s in blocks([dst, src], nbytes, read=[False, True], written=[True, False],
                           reverse=shared and dst.va > src.va):
            d[:] = s
            stats.step()
    stats.bytes_touched += 2 * nbytes


def _copy_staged(dst: Buffer, src: Buffer, nbytes: int, stats: KernelStats) -> None:
    """:func:`copy` through a staged copy of the whole source."""
    if nbytes > stats.max_staging:
        raise TooLarge(f"copy: the source ({nbytes} bytes) shares memory with the "
                       "destination under other addresses and would be staged whole, "
                       f"beyond the engine's {stats.max_staging}-byte staging limit")
    whole = staging(0, nbytes)
    pieces = range(0, nbytes, MAX_PIECE)
    for lo in pieces:
        src.move(lo, whole[lo:lo + MAX_PIECE], into_buffer=False)
        stats.step()
    for lo in pieces:  # in VA order
        dst.move(lo, whole[lo:lo + MAX_PIECE], into_buffer=True)
        stats.step()
    stats.staged_bytes += nbytes


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
    """``c[m, n] = a[m, k] @ b[k, n]`` (float32, row major).

    BLAS wants contiguous rows in blocks of a few hundred.  Row blocks of ``a`` and ``c``
    are used in place when each of their runs holds whole rows, a full block of them
    (huge-page guest memory and narrow matrices); otherwise each block is staged
    through a small per-thread scratch block, and ``b`` is staged whole unless it is one
    run -- the analogue of a GPU loading tiles.  ``stats.staged_bytes`` counts it.

    :raise TooLarge: ``b``, or ``c`` when it shares memory with an operand, would be
        staged whole in more than ``stats.max_staging`` bytes."""
    if m == 0 or n == 0:
        return  # an empty product: nothing to write
    if k == 0:  # a sum of no terms (fill_u32 counts the bytes it writes)
        fill_u32(c, m * n, 0, stats)
        return
    stats.bytes_touched += a.nbytes + b.nbytes + c.nbytes
    shared = c.overlaps(a) or c.overlaps(b)
    for name, staged, size in (("b", not b.single, b.nbytes), ("c", shared, 4 * m * n)):
        if staged and size > stats.max_staging:
            raise TooLarge(f"matmul: {name} ({size} bytes) would be staged whole, beyond "
                           f"the engine's {stats.max_staging}-byte staging limit")
    row_macs = n * k
    rows = max(1, _MATMUL_BLOCK_MACS // row_macs,
               min(_MATMUL_GOOD_ROWS, _MATMUL_MAX_BLOCK_MACS // row_macs))
    rows = min(rows, max(1, _MATMUL_BLOCK_BYTES // (4 * max(k, n))))
    if b.single:
        right = b.whole().view("<f4").reshape(k, n)
    else:
        right = b.gather(staging(1, b.nbytes)).view("<f4").reshape(k, n)
        stats.staged_bytes += b.nbytes
    a_in_place = _rows_in_runs(a, 4 * k, m, rows)
    # c is written block by block only if no operand shares its memory (row blocks
    # written early must not change rows read later); else the product is staged whole
    out_whole = staging(2, 4 * m * n).view("<f4").reshape(m, n) if shared else None
    c_in_place = not shared and _rows_in_runs(c, 4 * n, m, rows)
    in_place = [(a, 4 * k)] * a_in_place + [(c, 4 * n)] * c_in_place
    for r0, r1 in _row_blocks(m, rows, in_place):
        if a_in_place:
            left = _run_rows(a, 4 * k, r0, r1)
        else:
            left = staging(0, 4 * k * (r1 - r0))
            a.move(4 * k * r0, left, into_buffer=False)
            stats.staged_bytes += left.nbytes
        if out_whole is not None:
            out = out_whole[r0:r1].view(np.uint8).reshape(-1)
        elif c_in_place:
            out = _run_rows(c, 4 * n, r0, r1)
        else:
            out = staging(3, 4 * n * (r1 - r0))
        np.matmul(left.view("<f4").reshape(r1 - r0, k), right,
                  out=out.view("<f4").reshape(r1 - r0, n))
        if out_whole is None and not c_in_place:
            c.move(4 * n * r0, out, into_buffer=True)
            stats.staged_bytes += out.nbytes
        stats.step()
    if out_whole is not None:
        c.move(0, out_whole.view(np.uint8).reshape(-1), into_buffer=True)
        stats.staged_bytes += out_whole.nbytes


def _rows_in_runs(buf: Buffer, row_bytes: int, total_rows: int, rows: int) -> bool:
    """Every run of ``buf``'s first ``total_rows`` rows ends on a row boundary and (but
    the last) holds at least ``rows`` rows: row blocks can be views of single runs."""
    if buf.single:
        return True
    limit = row_bytes * total_rows
    ends = buf.ends[buf.ends < limit]
    lengths = np.diff(ends, prepend=0)
    return bool((ends % row_bytes == 0).all() and (lengths >= rows * row_bytes).all())


def _run_rows(buf: Buffer, row_bytes: int, r0: int, r1: int) -> npt.NDArray[np.uint8]:
    """The view of rows ``[r0, r1)``, which :func:`_row_blocks` put in one run."""
    view = buf.run_at(row_bytes * r0, row_bytes * r1)
    if view is None:  # _rows_in_runs and _row_blocks rule this out
        raise RuntimeError(f"rows [{r0}, {r1}) are not in one run")
    return view


def _row_blocks(m: int, rows: int, in_place: list[tuple[Buffer, int]]
                ) -> list[tuple[int, int]]:
    """``[r0, r1)`` blocks of at most ``rows`` rows, also cut where a run of an operand
    used in place (buffer, bytes per row) ends, so that its blocks fall in one run."""
    cuts = {0, m, *range(rows, m, rows)}
    for buf, row_bytes in in_place:
        ends = buf.ends // row_bytes
        cuts.update(int(e) for e in ends[(ends > 0) & (ends < m)])
    ordered = sorted(cuts)
    return list(itertools.pairwise(ordered))
