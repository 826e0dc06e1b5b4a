"""The simulated GPU's kernels, run on guest memory through the GPU page table.

A buffer argument is a GPU virtual range; the page table resolves it to host runs
(host-contiguous pieces of guest RAM).  Elementwise kernels walk the union of all their
operands' run boundaries and apply numpy to zero-copy views of each piece, so the
Python work is per run (2 MiB with transparent huge pages in the guest), never per
element.  A matrix multiply needs 2D operands: an operand made of several runs is
staged into engine scratch (the analogue of a GPU's on-chip tiles) and the count of
staged bytes is reported.
"""

from __future__ import annotations

import itertools
import threading
import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vgpu_backend.hostgpu import hostmem

__all__ = ["Buffer", "Cancelled", "KernelStats", "checksum_crc32", "copy", "fill_u32", "matmul_f32",
           "reduce_sum_f32", "saxpy_f32", "vadd_f32"]

I64 = npt.NDArray[np.int64]


#: the longest piece a kernel works on at once: its temporaries stay in cache
MAX_PIECE = 2 << 20
#: multiply-adds of one matmul block (between cancellation checks): ~0.1 s at most
_MATMUL_BLOCK_FLOPS = 1 << 27
_scratch = threading.local()


class Buffer:
    """A resolved buffer: ``nbytes`` bytes in host runs ``(addr, length)``, in order.

    One view spans all the runs (``window``); pieces are slices of it.  The window may
    cover memory between the runs that is not ours: only slices of the runs are ever
    touched.
    """

    __slots__ = ("addr", "ends", "length", "nbytes", "offset", "va", "window")

    def __init__(self, va: int, nbytes: int, addr: I64, length: I64) -> None:
        self.va = va
        self.nbytes = nbytes
        self.addr = addr
        self.length = length
        base = int(addr.min()) if addr.shape[0] else 0
        span = int((addr + length).max()) - base if addr.shape[0] else 0
        self.window = hostmem.view(base, span)
        self.offset = addr - base  # of each run in the window
        self.ends = np.cumsum(length)  # buffer offset where each run ends

    @property
    def single(self) -> bool:
        """One host run."""
        return int(self.addr.shape[0]) == 1

    def whole(self) -> npt.NDArray[np.uint8]:
        """A view of the whole buffer (only when :attr:`single`)."""
        first = int(self.offset[0])
        return self.window[first:first + self.nbytes]

    def _rows(self) -> tuple[npt.NDArray[np.uint8], npt.NDArray[np.int64]] | None:
        """The window as rows of a granule dividing every run, and the row index of
        every buffer row, when that granule is large enough to make it worthwhile."""
        unit = int(np.gcd.reduce(np.concatenate((self.offset, self.length, [4096]))))
        if unit < 256 or self.nbytes % unit:
            return None
        units = self.length // unit
        run = np.repeat(np.arange(units.shape[0]), units)
        within = np.arange(run.shape[0]) - np.repeat(np.cumsum(units) - units, units)
        rows = self.window[:self.window.shape[0] - self.window.shape[0] % unit]
        return rows.reshape(-1, unit), self.offset[run] // unit + within

    def gather(self) -> npt.NDArray[np.uint8]:
        """A contiguous copy of the buffer (engine scratch)."""
        out = np.empty(self.nbytes, dtype=np.uint8)
        table = self._rows() if self.addr.shape[0] > 8 else None
        if table is not None:
            rows, index = table
            np.take(rows, index, axis=0, out=out.reshape(-1, rows.shape[1]), mode="clip")
            return out
        for (piece,), (lo, hi) in zip(_pieces([self], self.nbytes), _bounds(
                [self], self.nbytes), strict=True):
            out[lo:hi] = piece
        return out

    def scatter(self, data: npt.NDArray[np.uint8]) -> None:
        """Write a contiguous array back over the runs."""
        table = self._rows() if self.addr.shape[0] > 8 else None
        if table is not None:
            rows, index = table
            rows[index] = data.reshape(-1, rows.shape[1])
            return
        for (piece,), (lo, hi) in zip(_pieces([self], self.nbytes), _bounds(
                [self], self.nbytes), strict=True):
            piece[:] = data[lo:hi]


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


def _bounds(buffers: list[Buffer], nbytes: int) -> list[tuple[int, int]]:
    """``[lo, hi)`` byte ranges splitting ``[0, nbytes)`` at every run boundary of every
    buffer and every :data:`MAX_PIECE`."""
    cuts = [np.arange(0, nbytes, MAX_PIECE, dtype=np.int64), np.array([nbytes], np.int64)]
    cuts += [b.ends[b.ends < nbytes] for b in buffers]
    return list(itertools.pairwise(np.unique(np.concatenate(cuts)).tolist()))


def _pieces(buffers: list[Buffer], nbytes: int) -> Iterator[list[npt.NDArray[np.uint8]]]:
    """Views of every buffer over the same byte range, piece by piece (see _bounds);
    the run lookups are done for all pieces at once."""
    bounds = _bounds(buffers, nbytes)
    if not bounds:
        return
    lo = np.array([b[0] for b in bounds], dtype=np.int64)
    starts: list[list[int]] = []
    for b in buffers:
        run = np.searchsorted(b.ends, lo, side="right")
        starts.append((b.offset[run] + lo - (b.ends[run] - b.length[run])).tolist())
    for k, (low, high) in enumerate(bounds):
        size = high - low
        yield [b.window[start[k]:start[k] + size] for b, start in zip(buffers, starts,
                                                                      strict=True)]


def _scratch_f32(count: int) -> npt.NDArray[np.float32]:
    """A per-thread float32 scratch array of at least ``count`` elements."""
    buf: npt.NDArray[np.float32] | None = getattr(_scratch, "f32", None)
    if buf is None or buf.shape[0] < count:
        buf = np.empty(max(count, MAX_PIECE // 4), dtype=np.float32)
        _scratch.f32 = buf
    return buf[:count]


def fill_u32(dst: Buffer, count: int, value: int, stats: KernelStats) -> None:
    """``dst[i] = value`` for ``count`` 32-bit words."""
    for (d,) in _pieces([dst], count * 4):
        d.view("<u4")[:] = value & 0xFFFFFFFF
        stats.step()
    stats.bytes_touched += count * 4


def copy(dst: Buffer, src: Buffer, nbytes: int, stats: KernelStats) -> None:
    """``memmove(dst, src, nbytes)`` in GPU virtual space."""
    pieces = list(_pieces([dst, src], nbytes))
    if dst.va > src.va:  # overlapping forward copy: go backwards, like memmove
        pieces.reverse()
    for d, s in pieces:
        d[:] = s
        stats.step()
    stats.bytes_touched += 2 * nbytes


def vadd_f32(dst: Buffer, a: Buffer, b: Buffer, count: int, stats: KernelStats) -> None:
    """``dst = a + b`` over ``count`` float32."""
    for d, x, y in _pieces([dst, a, b], count * 4):
        np.add(x.view("<f4"), y.view("<f4"), out=d.view("<f4"))
        stats.step()
    stats.bytes_touched += 3 * count * 4


def saxpy_f32(y: Buffer, x: Buffer, count: int, a: float, stats: KernelStats) -> None:
    """``y = a * x + y`` over ``count`` float32."""
    alpha = np.float32(a)
    for yv, xv in _pieces([y, x], count * 4):
        ys, xs = yv.view("<f4"), xv.view("<f4")
        tmp = _scratch_f32(xs.shape[0])
        np.multiply(xs, alpha, out=tmp)
        np.add(ys, tmp, out=ys)
        stats.step()
    stats.bytes_touched += 3 * count * 4


def reduce_sum_f32(x: Buffer, count: int, out: Buffer, stats: KernelStats) -> float:
    """Sum of ``count`` float32 (accumulated in float64), stored as float32 at ``out``."""
    total = 0.0
    for (xv,) in _pieces([x], count * 4):
        total += float(np.sum(xv.view("<f4"), dtype=np.float64))
        stats.step()
    out.scatter(np.frombuffer(np.float32(total).tobytes(), dtype=np.uint8))
    stats.bytes_touched += count * 4 + 4
    return total


def checksum_crc32(buf: Buffer, nbytes: int, stats: KernelStats) -> int:
    """CRC-32 (zlib's) of ``nbytes`` bytes."""
    crc = 0
    for (v,) in _pieces([buf], nbytes):
        crc = zlib.crc32(v.data, crc)
        stats.step()
    stats.bytes_touched += nbytes
    return crc


def matmul_f32(c: Buffer, a: Buffer, b: Buffer, m: int, n: int, k: int,
               stats: KernelStats) -> None:
    """``c[m, n] = a[m, k] @ b[k, n]`` (float32, row major)."""
    def operand(buf: Buffer, rows: int, cols: int) -> npt.NDArray[np.float32]:
        raw = buf.whole() if buf.single else buf.gather()
        if not buf.single:
            stats.staged_bytes += buf.nbytes
        return raw.view("<f4").reshape(rows, cols)

    left, right = operand(a, m, k), operand(b, k, n)
    out = c.whole().view("<f4").reshape(m, n) if c.single else np.empty((m, n), np.float32)
    rows = max(1, _MATMUL_BLOCK_FLOPS // max(1, n * k))  # cancellable between blocks
    for r in range(0, m, rows):
        np.matmul(left[r:r + rows], right, out=out[r:r + rows])
        stats.step()
    if not c.single:
        c.scatter(out.view(np.uint8).reshape(-1))
        stats.staged_bytes += c.nbytes
    stats.bytes_touched += a.nbytes + b.nbytes + c.nbytes
