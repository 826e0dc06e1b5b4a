"""Popped descriptor chains: the guest buffers of one request, as memory views.

A :class:`ChainBatch` holds what one pop of a ring found; chains in the common layout
stay offsets into their region until someone needs their :class:`DescriptorChain`.
"""

from __future__ import annotations

import mmap
from collections.abc import Iterator
from typing import TYPE_CHECKING

import numpy as np
import numpy.typing as npt

from protocol.errors import GuestProtocolError

if TYPE_CHECKING:
    from _typeshed import WriteableBuffer

__all__ = ["ChainBatch", "DescriptorChain", "PairItem"]

Bytes = npt.NDArray[np.uint8]


class DescriptorChain:
    """One popped request: device-readable (``out``) and device-writable (``inp``)
    buffers as byte memoryviews of guest memory.

    :ivar error: set when a buffer of the chain is unusable (the device answers with
        an error response).
    :ivar writable_ok: every writable buffer is usable (a response may be written).
    """

    __slots__ = ("error", "head", "in_len", "inp", "out", "out_len", "writable_ok")

    def __init__(self, head: int, out: list[memoryview] | None = None,
                 inp: list[memoryview] | None = None, out_len: int = 0,
                 in_len: int = 0) -> None:
        self.head = head
        self.out: list[memoryview] = out if out is not None else []
        self.inp: list[memoryview] = inp if inp is not None else []
        self.out_len = out_len
        self.in_len = in_len
        self.error: GuestProtocolError | None = None
        self.writable_ok = True

    def read(self, size: int, offset: int = 0) -> bytes:
        """Copy up to ``size`` readable bytes starting at ``offset`` (a snapshot)."""
        if len(self.out) == 1:
            return bytes(self.out[0][offset:offset + size])
        return self.read_array(offset, min(size, max(0, self.out_len - offset))).tobytes()

    def pieces(self, offset: int, size: int) -> list[memoryview]:
        """The readable guest memory of ``[offset, offset+size)``, one view per buffer
        it touches (views, not copies: the guest may change them).

        :raise GuestProtocolError: fewer bytes are present.
        """
        if offset + size > self.out_len:
            raise GuestProtocolError(
                f"command needs {offset + size} bytes, the chain has {self.out_len}")
        views = []
        for buf in self.out:
            if size == 0:
                break
            if offset >= len(buf):
                offset -= len(buf)
                continue
            piece = buf[offset:offset + size]
            views.append(piece)
            size -= len(piece)
            offset = 0
        return views

    def read_array(self, offset: int, size: int) -> Bytes:
        """Copy exactly ``size`` readable bytes at ``offset`` into a new array.

        :raise GuestProtocolError: fewer bytes are present.
        """
        out = np.empty(size, dtype=np.uint8)
        filled = 0
        for piece in self.pieces(offset, size):
            out[filled:filled + len(piece)] = np.frombuffer(piece, dtype=np.uint8)
            filled += len(piece)
        return out

    def write(self, data: bytes) -> int:
        """Scatter ``data`` into the writable buffers; returns the bytes written."""
        if len(self.inp) == 1:
            buf = self.inp[0]
            n = min(len(buf), len(data))
            buf[:n] = data[:n]
            return n
        written = 0
        for buf in self.inp:
            if written == len(data):
                break
            n = min(len(buf), len(data) - written)
            buf[:n] = data[written:written + n]
            written += n
        return written


#: a chain in the common layout, not yet built: (head, its region's mapping, readable
#: offset, readable length, writable offset, writable length), offsets in the mapping
PairItem = tuple[int, mmap.mmap, int, int, int, int]


class ChainBatch:
    """The chains of one pop, in ring order.

    Chains in the common layout -- one readable then one writable buffer, both in one
    memory region, as Linux's INDIRECT pairs are -- are kept as offsets until someone
    asks for their :class:`DescriptorChain`: a device that only needs the command's
    first bytes and a place for the response header never builds one.  Offsets do not
    keep the region mapped: a batch is used until the memory table next changes (a
    built chain's views, like any, keep their pages mapped).
    """

    __slots__ = ("_items",)

    def __init__(self, items: list[DescriptorChain | PairItem] | None = None) -> None:
        self._items = items if items is not None else []

    def __len__(self) -> int:
        return len(self._items)

    def __getitem__(self, index: int) -> DescriptorChain:
        """Chain ``index`` (built now if it was kept as offsets)."""
        item = self._items[index]
        if isinstance(item, DescriptorChain):
            return item
        head, mapping, out_at, out_len, in_at, in_len = item
        view = memoryview(mapping)
        chain = DescriptorChain(head, [view[out_at:out_at + out_len]],
                                [view[in_at:in_at + in_len]], out_len, in_len)
        self._items[index] = chain
        return chain

    def __iter__(self) -> Iterator[DescriptorChain]:
        return (self[i] for i in range(len(self._items)))

    def commands(self, size: int, answer: int) -> Iterator[
            tuple[int, bytes, WriteableBuffer | None, int, GuestProtocolError | None]]:
        """For each chain in order: its head; a copy of its first ``size`` readable
        bytes (fewer if it has fewer); the buffer and the offset in it where
        ``answer`` response bytes go in one piece (buffer None when its writable part
        is not one usable buffer that large); why a buffer of it is unusable (None:
        all are usable)."""
        for item in self._items:
            if isinstance(item, DescriptorChain):
                slot = item.inp[0] if item.writable_ok and len(item.inp) == 1 and \
                    item.in_len >= answer else None
                yield item.head, item.read(size), slot, 0, item.error
            else:
                head, mapping, out_at, out_len, in_at, in_len = item
                # a conditional, not min(): calling min() costs more than the copy
                yield (head, mapping[out_at:out_at + (out_len if out_len < size else size)],
                       mapping if in_len >= answer else None, in_at, None)
