"""The guest pages behind a resource, and reads from them.

A :class:`Backing` keeps the translated segments of the guest's mem entries (region
id, offset, length), never views: views are made per operation, so a region can be
unmapped as soon as every backing that uses it is dropped.
"""

from __future__ import annotations

from math import gcd
from typing import Final

import numpy as np
import numpy.typing as npt

from protocol.errors import GuestProtocolError
from protocol.virtio_gpu import MemEntry
from protocol.wire import layout
from vgpu_backend.chains import DescriptorChain
from vgpu_backend.guest_memory import GuestMemory, Segments

__all__ = ["Backing", "read_mem_entries"]

Bytes = npt.NDArray[np.uint8]
_I64 = npt.NDArray[np.int64]
#: pieces smaller than this are gathered piece by piece instead of by index arrays
_MIN_GATHER_UNIT: Final = 64
#: pieces of at least this many units are copied one by one too: fewer Python steps
#: than index entries (8 bytes each, several arrays) would cost
_UNITS_PER_LOOPED_PIECE: Final = 64
_ENTRY_DTYPE: Final = layout(MemEntry).dtype
_ENTRY_SIZE: Final = layout(MemEntry).size


class Backing:
    """A resource's backing store: ``segments`` in guest order, ``size`` bytes long."""

    def __init__(self, memory: GuestMemory, segments: Segments) -> None:
        self._memory = memory
        self.segments = segments
        self.size = segments.total
        self._ends = np.cumsum(segments.length, dtype=np.uint64)
        self.region_ids = frozenset(
            np.flatnonzero(np.bincount(segments.region_id)).tolist() if len(segments) else ())

    def uses_region(self, region_id: int) -> bool:
        """The backing has pages in this region."""
        return region_id in self.region_ids

    def read(self, start: int, size: int) -> Bytes:
        """Bytes ``[start, start+size)`` of the backing: a view when they are contiguous
        in guest RAM, else a gathered copy.

        :raise GuestProtocolError: the range is beyond the backing.
        """
        direct = self._direct(start, size)
        if direct is not None:
            return direct
        out = np.empty(size, dtype=np.uint8)
        self._move(_one(start), _one(size), out, to_guest=False)
        return out

    def read_rows(self, start: int, stride: int, row_bytes: int, rows: int) -> Bytes:
        """``rows`` rows of ``row_bytes`` bytes, ``stride`` apart from ``start`` on, as a
        ``(rows, row_bytes)`` array: a strided view when the span is contiguous in guest
        RAM, else a copy (of the whole span only when the gaps between the rows are
        small: a guest-chosen stride can make them as large as the backing).

        :raise GuestProtocolError: a row is beyond the backing.
        """
        if rows <= 0 or row_bytes <= 0 or stride < row_bytes:
            raise ValueError(f"{rows} rows of {row_bytes} bytes, stride {stride}")
        span = (rows - 1) * stride + row_bytes
        direct = self._direct(start, span)
        if direct is not None:
            return np.lib.stride_tricks.as_strided(direct, (rows, row_bytes), (stride, 1))
        if span <= 2 * rows * row_bytes:  # little between the rows: one range is faster
            whole = np.empty(span, dtype=np.uint8)
            self._move(_one(start), _one(span), whole, to_guest=False)
            return np.lib.stride_tricks.as_strided(whole, (rows, row_bytes), (stride, 1))
        out = np.empty((rows, row_bytes), dtype=np.uint8)
        row = np.arange(rows, dtype=np.int64)
        self._move(start + row * stride, np.full(rows, row_bytes, np.int64), out.reshape(-1),
                   to_guest=False)
        return out

    def read_into(self, start: int, out: Bytes) -> None:
        """Copy backing bytes ``[start, start+len(out))`` into ``out`` (contiguous).

        :raise GuestProtocolError: the range is beyond the backing.
        """
        direct = self._direct(start, out.shape[0])
        if direct is not None:
            out[:] = direct
        else:
            self._move(_one(start), _one(out.shape[0]), out, to_guest=False)

    def write(self, start: int, data: Bytes) -> None:
        """Store ``data`` at ``[start, start+len(data))`` of the backing (guest RAM).

        :raise GuestProtocolError: the range is beyond the backing.
        """
        direct = self._direct(start, data.shape[0])
        if direct is not None:
            direct[:] = data
        else:
            self._move(_one(start), _one(data.shape[0]), data, to_guest=True)

    def _direct(self, start: int, size: int) -> Bytes | None:
        """A view of ``[start, start+size)`` if it lies in one segment, else ``None``."""
        if start < 0 or size < 0 or start + size > self.size:
            raise GuestProtocolError(
                f"bytes {start}..{start + size} are beyond the {self.size}-byte backing")
        if size == 0:
            return np.zeros(0, dtype=np.uint8)
        first = int(np.searchsorted(self._ends, np.uint64(start), side="right"))
        if start + size > int(self._ends[first]):
            return None
        seg_start = int(self._ends[first]) - int(self.segments.length[first])
        region = self._memory.region(int(self.segments.region_id[first]))
        off = int(self.segments.offset[first]) + start - seg_start
        return region.array[off:off + size]

    def _move(self, starts: _I64, sizes: _I64, buf: Bytes, *, to_guest: bool) -> None:
        """Copy between ``buf`` and the backing ranges ``[starts, starts+sizes)`` (in
        order, disjoint, non-empty, inside the backing), which ``buf`` holds one after
        the other: split at segment boundaries into pieces, then vectorised as rows of
        ``unit`` bytes, ``unit`` the largest power-of-two granule (<= 4 KiB) dividing
        every piece.  Ranges and segments being sorted and disjoint, there are fewer
        pieces than ranges plus segments."""
        ends = self._ends.astype(np.int64)
        seg_length = self.segments.length.astype(np.int64)
        first = np.searchsorted(ends, starts, side="right")
        count = np.searchsorted(ends, starts + sizes - 1, side="right") - first + 1
        owner = np.repeat(np.arange(starts.shape[0]), count)
        seg = first[owner] + np.arange(owner.shape[0]) - np.repeat(np.cumsum(count) - count,
                                                                    count)
        seg_start = ends[seg] - seg_length[seg]
        lo = np.maximum(starts[owner], seg_start)
        length = np.minimum((starts + sizes)[owner], ends[seg]) - lo
        region_id = self.segments.region_id[seg]
        src = self.segments.offset[seg].astype(np.int64) + (lo - seg_start)
        dst = (np.cumsum(sizes) - sizes)[owner] + (lo - starts[owner])  # piece in ``buf``
        unit = gcd(int(np.gcd.reduce(src)), int(np.gcd.reduce(length)),
                   int(np.gcd.reduce(dst)), 4096)
        units = length // unit
        if unit < _MIN_GATHER_UNIT or \
                length.shape[0] * _UNITS_PER_LOOPED_PIECE <= int(units.sum()):
            # Unaligned or large pieces: one by one (as QEMU's iov_to_buf does); fewer
            # than the ranges plus the entries, both bounded by limits.
            for rid, s, n, d in zip(region_id.tolist(), src.tolist(), length.tolist(),
                                    dst.tolist(), strict=True):
                guest = self._memory.region(rid).array[s:s + n]
                if to_guest:
                    guest[:] = buf[d:d + n]
                else:
                    buf[d:d + n] = guest
            return
        piece = np.repeat(np.arange(units.shape[0]), units)
        within = np.arange(piece.shape[0]) - np.repeat(np.cumsum(units) - units, units)
        src_units = src[piece] // unit + within
        dst_units = dst[piece] // unit + within
        buf_rows = buf.reshape(-1, unit)  # unit divides every piece, hence the size
        regions = np.unique(region_id).tolist()
        for rid in regions:
            array = self._memory.region(rid).array
            rows = array[:array.shape[0] - array.shape[0] % unit].reshape(-1, unit)
            if len(regions) == 1:  # dst_units is 0..n-1: gather straight into ``buf``
                if to_guest:
                    rows[src_units] = buf_rows
                else:
                    # indices are in range by construction; "clip" lets numpy write
                    # straight into ``out`` ("raise" buffers the whole result first)
                    np.take(rows, src_units, axis=0, out=buf_rows, mode="clip")
                continue
            mask = region_id[piece] == rid
            if to_guest:
                rows[src_units[mask]] = buf_rows[dst_units[mask]]
            else:
                buf_rows[dst_units[mask]] = rows[src_units[mask]]


def _one(value: int) -> _I64:
    return np.array([value], dtype=np.int64)


def read_mem_entries(chain: DescriptorChain, offset: int, count: int,
                     limit: int) -> tuple[npt.NDArray[np.uint64], npt.NDArray[np.uint64]]:
    """Snapshot ``count`` ``virtio_gpu_mem_entry`` from the chain at ``offset``.

    The count is checked against ``limit`` and against the bytes really present in
    the chain before anything is allocated; the entries are copied once (so the guest
    cannot change them between validation and use) and returned as (addr, length).

    :raise GuestProtocolError: too many entries, or fewer bytes than they need.
    """
    if count > limit:
        raise GuestProtocolError(f"{count} entries exceed the limit of {limit}")
    need = count * _ENTRY_SIZE
    if offset + need > chain.out_len:
        raise GuestProtocolError(
            f"{count} entries need {need} bytes, the chain has {chain.out_len - offset}")
    pieces = chain.pieces(offset, need)
    if any(len(piece) % _ENTRY_SIZE for piece in pieces):  # an entry split across buffers
        entries = chain.read_array(offset, need).view(_ENTRY_DTYPE)
        return np.ascontiguousarray(entries["addr"]), entries["length"].astype(np.uint64)
    # straight from guest memory into contiguous columns (every later pass streams
    # half the bytes); each column is one snapshot, validated after the copy
    addr = np.empty(count, dtype=np.uint64)
    length = np.empty(count, dtype=np.uint64)
    done = 0
    for piece in pieces:  # one per descriptor buffer, not per entry
        entries = np.frombuffer(piece, dtype=_ENTRY_DTYPE)
        addr[done:done + len(entries)] = entries["addr"]
        length[done:done + len(entries)] = entries["length"]
        done += len(entries)
    return addr, length
