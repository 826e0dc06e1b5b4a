"""Kernel operands: GPU buffers resolved to host runs, and how kernels walk them.

The GPU page table resolves a buffer to host runs: host-contiguous pieces of guest RAM
(or of a host buffer).  Runs are page-structured: the first may start inside a page,
every later one starts on a page boundary, and all but the last end on one.

Elementwise kernels walk all their operands in lockstep with :func:`blocks`:

* large runs (2 MiB with huge pages in the guest): zero-copy views of every piece
  between two run boundaries, so the Python work is per run;
* small runs (4 KiB pages of ordinary guest memory): fixed blocks of
  :data:`MAX_PIECE` bytes, each operand that is scattered within a block gathered page
  by page with one vectorised ``take`` into per-thread staging and, when written,
  scattered back the same way, touching exactly the block's bytes (the analogue of a
  GPU's gather loads).  A per-page Python loop costs more than the copies.
"""

from __future__ import annotations

import itertools
import threading
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import numpy as np
import numpy.typing as npt

from vgpu_backend.hostgpu import hostmem

__all__ = ["MAX_PIECE", "PAGE", "STAGING_CACHE_BYTES", "Buffer", "blocks", "staging"]

I64 = npt.NDArray[np.int64]
U8 = npt.NDArray[np.uint8]

PAGE = 4096
#: the longest piece a kernel works on at once: its temporaries stay in cache
MAX_PIECE = 2 << 20
#: runs shorter than this on average make :func:`blocks` stage instead of walking runs
_STAGE_BELOW = 64 << 10
#: staging memory a worker thread keeps between dispatches (a matmul's scattered right
#: operand, 256 MiB at 8192², plus its row blocks): fresh large arrays cost page faults
#: and THP compaction each time
STAGING_CACHE_BYTES = 320 << 20
_scratch = threading.local()


@dataclass(frozen=True, slots=True)
class _Paging:
    """A page-structured buffer as page rows: logical page ``k`` (buffer bytes
    ``[k*PAGE - phase, (k+1)*PAGE - phase)``) is row ``index[k]`` of ``rows``."""

    rows: npt.NDArray[np.uint8]
    index: I64
    phase: int


class Buffer:
    """A resolved buffer: ``nbytes`` bytes in host runs ``(addr, length)``, in order.

    One view spans the pages of all the runs (``window``); pieces are slices of it.
    The window may cover memory between the runs that is not ours: only the runs'
    bytes are ever touched.
    """

    __slots__ = ("_paging", "_paging_known", "addr", "ends", "length", "nbytes", "offset",
                 "va", "window")

    def __init__(self, va: int, nbytes: int, addr: I64, length: I64) -> None:
        self.va = va
        self.nbytes = nbytes
        self.addr = addr
        self.length = length
        if addr.shape[0]:
            base = int(addr.min()) & -PAGE
            end = -(-int((addr + length).max()) // PAGE) * PAGE
        else:
            base = end = 0
        self.window = hostmem.view(base, end - base)
        self.offset = addr - base  # of each run in the window
        self.ends = np.cumsum(length)  # buffer offset where each run ends
        self._paging: _Paging | None = None
        self._paging_known = False

    @property
    def single(self) -> bool:
        """One host run."""
        return int(self.addr.shape[0]) == 1

    def whole(self) -> U8:
        """A view of the whole buffer (only when :attr:`single`)."""
        first = int(self.offset[0])
        return self.window[first:first + self.nbytes]

    @property
    def page_structured(self) -> bool:
        """The runs are page-structured (see the module docstring): :meth:`move` copies
        whole pages at once."""
        return self._pages() is not None

    def _pages(self) -> _Paging | None:
        """The page rows, or None when the runs are not page-structured."""
        if not self._paging_known:
            self._paging, self._paging_known = self._compute_paging(), True
        return self._paging

    def _compute_paging(self) -> _Paging | None:
        if not self.addr.shape[0] or self.window.shape[0] % PAGE:
            return None
        phase = int(self.offset[0]) % PAGE
        if (self.offset[1:] % PAGE).any() or ((self.ends[:-1] + phase) % PAGE).any():
            return None
        first_page = (self.ends - self.length + phase) // PAGE
        first_page[0] = 0
        pages = -(-(self.ends + phase) // PAGE) - first_page
        first_row = (self.offset - np.where(np.arange(len(self.offset)) == 0, phase, 0)) // PAGE
        index = np.repeat(first_row - first_page, pages) + np.arange(int(pages.sum()))
        return _Paging(self.window.reshape(-1, PAGE), index.astype(np.int64), phase)

    def move(self, lo: int, flat: U8, *, into_buffer: bool) -> None:
        """Copy between buffer bytes ``[lo, lo + len(flat))`` and ``flat``: whole pages
        with one vectorised take/put, the partial pages at the ends by slices; no byte
        outside the range is written."""
        hi = lo + flat.shape[0]
        paging = self._pages()
        if paging is None:
            self._move_by_runs(lo, flat, into_buffer=into_buffer)
            return
        phase, index, rows = paging.phase, paging.index, paging.rows
        full_lo = -(-(lo + phase) // PAGE)  # first and last+1 logical page fully inside
        full_hi = (hi + phase) // PAGE
        head_end = min(hi, full_lo * PAGE - phase)
        if head_end > lo:
            self._move_in_page(paging, lo, flat[:head_end - lo], into_buffer)
        if full_hi > full_lo:
            start = full_lo * PAGE - phase - lo
            middle = flat[start:start + (full_hi - full_lo) * PAGE].reshape(-1, PAGE)
            if into_buffer:
                rows[index[full_lo:full_hi]] = middle
            else:
                np.take(rows, index[full_lo:full_hi], axis=0, out=middle, mode="clip")
        tail_start = max(head_end, full_hi * PAGE - phase)
        if hi > tail_start:
            self._move_in_page(paging, tail_start, flat[tail_start - lo:], into_buffer)

    def _move_in_page(self, paging: _Paging, lo: int, flat: U8, into_buffer: bool) -> None:
        page, within = divmod(lo + paging.phase, PAGE)
        row = paging.rows[int(paging.index[page])]
        if into_buffer:
            row[within:within + flat.shape[0]] = flat
        else:
            flat[:] = row[within:within + flat.shape[0]]

    def _move_by_runs(self, lo: int, flat: U8, *, into_buffer: bool) -> None:
        for (piece,), (p_lo, p_hi) in zip(_run_pieces([self], lo, lo + flat.shape[0]),
                                          _bounds([self], lo, lo + flat.shape[0]),
                                          strict=True):
            if into_buffer:
                piece[:] = flat[p_lo - lo:p_hi - lo]
            else:
                flat[p_lo - lo:p_hi - lo] = piece

    def gather(self, out: U8 | None = None) -> U8:
        """A contiguous copy of the buffer, into ``out`` (``nbytes``) or a new array."""
        if out is None:
            out = np.empty(self.nbytes, dtype=np.uint8)
        self.move(0, out, into_buffer=False)
        return out

    def scatter(self, data: U8) -> None:
        """Write a contiguous array back over the runs."""
        self.move(0, data, into_buffer=True)

    def overlaps(self, other: Buffer) -> bool:
        """Some byte of host memory is in both buffers (two blobs may share pages)."""
        if not self.addr.shape[0] or not other.addr.shape[0]:
            return False
        order = np.argsort(other.addr, kind="stable")
        starts = other.addr[order]
        reach = np.maximum.accumulate(starts + other.length[order])
        # the runs of ``other`` starting before each run of ours ends: does one reach in?
        last = np.searchsorted(starts, self.addr + self.length, side="left") - 1
        return bool(np.any((last >= 0) & (reach[np.maximum(last, 0)] > self.addr)))

    def same_mapping(self, other: Buffer) -> bool:
        """Both buffers are windows of one injective map from GPU VAs to host bytes: a
        VA in both names the same host byte in both, and no host byte has two VAs (no
        page mapped twice, by one buffer or across the two).  Then a walk in VA order
        (backwards when the destination is above the source) is a memmove."""
        va = np.concatenate([b.va + b.ends - b.length for b in (self, other)])
        host = np.concatenate([self.addr, other.addr])
        length = np.concatenate([self.length, other.length])
        # runs overlapping in VA space or in host space must be the same VA -> host shift
        return _one_shift_where_overlapping(va, length, host - va) and \
            _one_shift_where_overlapping(host, length, host - va)

    def run_at(self, lo: int, hi: int) -> U8 | None:
        """A view of ``[lo, hi)`` when one run holds it all, else None."""
        run = int(np.searchsorted(self.ends, lo, side="right"))
        if run >= self.ends.shape[0] or hi > int(self.ends[run]):
            return None
        start = int(self.offset[run]) + lo - (int(self.ends[run]) - int(self.length[run]))
        return self.window[start:start + hi - lo]


def _one_shift_where_overlapping(start: I64, length: I64, shift: I64) -> bool:
    """Intervals ``[start, start + length)`` that overlap, directly or through others,
    have the same ``shift``: each cluster of overlapping intervals has one."""
    order = np.argsort(start, kind="stable")
    starts, shifts = start[order], shift[order]
    reach = np.maximum.accumulate(starts + length[order])
    first = np.ones(starts.shape[0], dtype=bool)  # of its cluster
    first[1:] = starts[1:] >= reach[:-1]
    cluster = np.cumsum(first) - 1
    return bool(np.all(shifts == shifts[first][cluster]))


def _bounds(buffers: Sequence[Buffer], lo: int, hi: int) -> list[tuple[int, int]]:
    """``[a, b)`` byte ranges splitting ``[lo, hi)`` at every run boundary of every
    buffer and every multiple of :data:`MAX_PIECE`."""
    cuts = [np.arange(lo - lo % MAX_PIECE + MAX_PIECE, hi, MAX_PIECE, dtype=np.int64),
            np.array([lo, hi], np.int64)]
    cuts += [b.ends[(b.ends > lo) & (b.ends < hi)] for b in buffers]
    return list(itertools.pairwise(np.unique(np.concatenate(cuts)).tolist()))


def _run_pieces(buffers: Sequence[Buffer], lo: int, hi: int) -> Iterator[list[U8]]:
    """Views of every buffer over the same byte range, piece by piece (see _bounds);
    the run lookups are done for all pieces at once."""
    bounds = _bounds(buffers, lo, hi)
    if not bounds:
        return
    low = np.array([b[0] for b in bounds], dtype=np.int64)
    starts: list[list[int]] = []
    for b in buffers:
        run = np.searchsorted(b.ends, low, side="right")
        starts.append((b.offset[run] + low - (b.ends[run] - b.length[run])).tolist())
    for k, (a, z) in enumerate(bounds):
        yield [b.window[start[k]:start[k] + z - a] for b, start in zip(buffers, starts,
                                                                       strict=True)]


def _block_scratch(slot: int, nbytes: int) -> U8:
    """``nbytes`` (at most a block) of this thread's staging block for operand ``slot``."""
    slots: list[U8] = getattr(_scratch, "blocks", [])
    _scratch.blocks = slots
    while len(slots) <= slot:
        slots.append(np.empty(0, dtype=np.uint8))
    if slots[slot].shape[0] < nbytes:
        slots[slot] = np.empty(max(nbytes, MAX_PIECE), dtype=np.uint8)
    return slots[slot][:nbytes]


def blocks(buffers: Sequence[Buffer], nbytes: int, *, read: Sequence[bool] | None = None,
           written: Sequence[bool] | None = None, reverse: bool = False) -> Iterator[list[U8]]:
    """Views of every buffer over the same byte range, range by range, covering
    ``[0, nbytes)`` (backwards with ``reverse``).

    ``read[i]``/``written[i]`` say whether operand ``i`` is read (default: all) and
    written (default: none); a staged operand is gathered only when read and scattered
    back after the caller's loop body only when written.
    """
    count = len(buffers)
    reads = list(read) if read is not None else [True] * count
    writes = list(written) if written is not None else [False] * count
    runs = sum(int(b.addr.shape[0]) for b in buffers)
    if runs * _STAGE_BELOW <= nbytes * count or any(
            b.addr.shape[0] > 1 and not b.page_structured for b in buffers):
        pieces = list(_run_pieces(buffers, 0, nbytes))
        yield from reversed(pieces) if reverse else pieces
        return
    starts = range(0, nbytes, MAX_PIECE)
    for lo in reversed(starts) if reverse else starts:
        hi = min(nbytes, lo + MAX_PIECE)
        views, staged = [], []
        for i, buf in enumerate(buffers):
            view = buf.run_at(lo, hi)
            if view is None:
                view = _block_scratch(i, hi - lo)
                if reads[i]:
                    buf.move(lo, view, into_buffer=False)
                staged.append(i)
            views.append(view)
        yield views
        for i in staged:
            if writes[i]:
                buffers[i].move(lo, views[i], into_buffer=True)


def staging(slot: int, nbytes: int) -> U8:
    """``nbytes`` of this thread's staging memory for operand ``slot``: kept between
    dispatches while the thread's slots total at most :data:`STAGING_CACHE_BYTES`."""
    slots: list[U8] = getattr(_scratch, "staging", [])
    _scratch.staging = slots
    while len(slots) <= slot:
        slots.append(np.empty(0, dtype=np.uint8))
    if slots[slot].shape[0] >= nbytes:
        return slots[slot][:nbytes]
    fresh = np.empty(nbytes, dtype=np.uint8)
    if sum(s.shape[0] for i, s in enumerate(slots) if i != slot) + nbytes <= \
            STAGING_CACHE_BYTES:
        slots[slot] = fresh
    return fresh
