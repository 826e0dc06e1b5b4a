"""Split virtqueue layout (virtio 1.x, section 2.7) and the EVENT_IDX arithmetic.

Rings live in guest memory; these declarations give their byte layout, and the
numpy dtypes that view them in place.  All fields are little-endian.

* descriptor table: ``struct virtq_desc[N]`` at ``desc``;
* available ring:  ``le16 flags; le16 idx; le16 ring[N]; le16 used_event``;
* used ring:       ``le16 flags; le16 idx; struct virtq_used_elem ring[N]; le16 avail_event``.
"""

from __future__ import annotations

from enum import IntFlag
from typing import Final, NamedTuple

from protocol.wire import U16, U32, U64, layout, wire

__all__ = [
    "AVAIL_RING_OFFSET",
    "DESC_DTYPE",
    "USED_ELEM_DTYPE",
    "USED_RING_OFFSET",
    "AvailFlag",
    "DescFlag",
    "UsedFlag",
    "VirtqDesc",
    "VirtqUsedElem",
    "avail_ring_size",
    "desc_table_size",
    "used_ring_size",
    "vring_need_event",
]


class DescFlag(IntFlag):
    """``VRING_DESC_F_*``."""

    NEXT = 1
    WRITE = 2
    INDIRECT = 4


class AvailFlag(IntFlag):
    """``VRING_AVAIL_F_*``."""

    NO_INTERRUPT = 1


class UsedFlag(IntFlag):
    """``VRING_USED_F_*``."""

    NO_NOTIFY = 1


@wire("struct virtq_desc")
class VirtqDesc(NamedTuple):
    """``struct virtq_desc { le64 addr; le32 len; le16 flags; le16 next; };``"""

    addr: U64
    len: U32
    flags: U16
    next: U16


@wire("struct virtq_used_elem")
class VirtqUsedElem(NamedTuple):
    """``struct virtq_used_elem { le32 id; le32 len; };``"""

    id: U32
    len: U32


DESC_DTYPE: Final = layout(VirtqDesc).dtype
USED_ELEM_DTYPE: Final = layout(VirtqUsedElem).dtype
DESC_SIZE: Final = layout(VirtqDesc).size
#: offset of ``ring[]`` in the available ring (after flags and idx)
AVAIL_RING_OFFSET: Final = 4
#: offset of ``ring[]`` in the used ring
USED_RING_OFFSET: Final = 4


def desc_table_size(num: int) -> int:
    """Bytes of a descriptor table of ``num`` entries."""
    return DESC_SIZE * num


def avail_ring_size(num: int) -> int:
    """Bytes of the available ring including ``used_event``."""
    return 6 + 2 * num


def used_ring_size(num: int) -> int:
    """Bytes of the used ring including ``avail_event``."""
    return 6 + 8 * num


def vring_need_event(event_idx: int, new_idx: int, old_idx: int) -> bool:
    """``vring_need_event()``: must the other side be notified after moving an index
    from ``old_idx`` to ``new_idx``, given its published ``event_idx``?  (16-bit wrap.)"""
    return ((new_idx - event_idx - 1) & 0xFFFF) < ((new_idx - old_idx) & 0xFFFF)
