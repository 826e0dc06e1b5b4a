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

import zlib
from collections.abc import Iterator
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vgpu_backend.hostgpu import hostmem

__all__ = ["Buffer", "KernelStats", "checksum_crc32", "copy", "fill_u32", "matmul_f32",
           "reduce_sum_f32", "saxpy_f32", "vadd_f32"]

I64 = npt.NDArray[np.int64]


@dataclass(frozen=True, slots=True)
class Buffer:
    """A resolved buffer: ``nbytes`` bytes in host runs ``(addr, length)`` in order."""

    va: int
    nbytes: int
    addr: I64
    length: I64

    @property
    def single(self) -> bool:
        """One host run."""
        return int(self.addr.shape[0]) == 1

    def whole(self) -> npt.NDArray[np.uint8]:
        """A view of the whole buffer (only when :attr:`single`)."""
        return hostmem.view(int(self.addr[0]), self.nbytes)

    def gather(self) -> npt.NDArray[np.uint8]:
        """A contiguous copy of the buffer (engine scratch)."""
        out = np.empty(self.nbytes, dtype=np.uint8)
        pos = 0
        for a, n in zip(self.addr.tolist(), self.length.tolist(), strict=True):
            out[pos:pos + n] = hostmem.view(a, n)
            pos += n
        return out

    def scatter(self, data: npt.NDArray[np.uint8]) -> None:
        """Write a contiguous array back over the runs."""
        pos = 0
        for a, n in zip(self.addr.tolist(), self.length.tolist(), strict=True):
            hostmem.view(a, n)[:] = data[pos:pos + n]
            pos += n


@dataclass(slots=True)
class KernelStats:
    """What a kernel did (for results and the demo's summary)."""

    bytes_touched: int = 0
    staged_bytes: int = 0
    pieces: int = 0


def _pieces(buffers: list[Buffer], nbytes: int) -> Iterator[list[npt.NDArray[np.uint8]]]:
    """Views of every buffer over the same byte range, piece by piece, split at every
    run boundary of any buffer."""
    ends = [np.cumsum(b.length) for b in buffers]
    bounds = np.unique(np.concatenate([e[e < nbytes] for e in ends] + [np.array([0, nbytes])]))
    starts_of = [e - b.length for e, b in zip(ends, buffers, strict=True)]
    for lo, hi in zip(bounds[:-1].tolist(), bounds[1:].tolist(), strict=True):
        views = []
        for b, e, s in zip(buffers, ends, starts_of, strict=True):
            run = int(np.searchsorted(e, lo, side="right"))
            views.append(hostmem.view(int(b.addr[run]) + lo - int(s[run]), hi - lo))
        yield views


def fill_u32(dst: Buffer, count: int, value: int, stats: KernelStats) -> None:
    """``dst[i] = value`` for ``count`` 32-bit words."""
    for (d,) in _pieces([dst], count * 4):
        d.view("<u4")[:] = value & 0xFFFFFFFF
        stats.pieces += 1
    stats.bytes_touched += count * 4


def copy(dst: Buffer, src: Buffer, nbytes: int, stats: KernelStats) -> None:
    """``memmove(dst, src, nbytes)`` in GPU virtual space."""
    pieces = list(_pieces([dst, src], nbytes))
    if dst.va > src.va:  # overlapping forward copy: go backwards, like memmove
        pieces.reverse()
    for d, s in pieces:
        d[:] = s
        stats.pieces += 1
    stats.bytes_touched += 2 * nbytes


def vadd_f32(dst: Buffer, a: Buffer, b: Buffer, count: int, stats: KernelStats) -> None:
    """``dst = a + b`` over ``count`` float32."""
    for d, x, y in _pieces([dst, a, b], count * 4):
        np.add(x.view("<f4"), y.view("<f4"), out=d.view("<f4"))
        stats.pieces += 1
    stats.bytes_touched += 3 * count * 4


def saxpy_f32(y: Buffer, x: Buffer, count: int, a: float, stats: KernelStats) -> None:
    """``y = a * x + y`` over ``count`` float32."""
    alpha = np.float32(a)
    scratch = np.empty(0, dtype=np.float32)
    for yv, xv in _pieces([y, x], count * 4):
        ys, xs = yv.view("<f4"), xv.view("<f4")
        if scratch.shape[0] < xs.shape[0]:
            scratch = np.empty(xs.shape[0], dtype=np.float32)
        tmp = scratch[:xs.shape[0]]
        np.multiply(xs, alpha, out=tmp)
        np.add(ys, tmp, out=ys)
        stats.pieces += 1
    stats.bytes_touched += 3 * count * 4


def reduce_sum_f32(x: Buffer, count: int, out: Buffer, stats: KernelStats) -> float:
    """Sum of ``count`` float32 (accumulated in float64), stored as float32 at ``out``."""
    total = 0.0
    for (xv,) in _pieces([x], count * 4):
        total += float(np.sum(xv.view("<f4"), dtype=np.float64))
        stats.pieces += 1
    next(_pieces([out], 4))[0].view("<f4")[0] = np.float32(total)
    stats.bytes_touched += count * 4 + 4
    return total


def checksum_crc32(buf: Buffer, nbytes: int, stats: KernelStats) -> int:
    """CRC-32 (zlib's) of ``nbytes`` bytes."""
    crc = 0
    for (v,) in _pieces([buf], nbytes):
        crc = zlib.crc32(v.data, crc)
        stats.pieces += 1
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
    if c.single:
        np.matmul(left, right, out=c.whole().view("<f4").reshape(m, n))
    else:
        result = np.matmul(left, right)
        c.scatter(result.view(np.uint8).reshape(-1))
        stats.staged_bytes += c.nbytes
    stats.bytes_touched += a.nbytes + b.nbytes + c.nbytes
    stats.pieces += 1
