"""USERPTR entry lists: the guest's pinned pages as host ranges, vectorised.

The guest (userptr series v5) pins ``[addr & PAGE_MASK, roundup(addr + size))`` of a
program's buffer and sends one entry per physically contiguous run: page-aligned,
non-zero, coalesced; ``size`` is the caller's unaligned size.  Here the entries are
validated, translated to host ranges inside the guest-RAM mappings (split at region
boundaries), and host-contiguous neighbours are merged, with numpy over the whole
entry array: no per-entry Python.
"""

from __future__ import annotations

from typing import Final

import numpy as np
import numpy.typing as npt

from protocol.errors import GuestProtocolError
from protocol.virtio_gpu_codes import Resp
from vgpu_backend.guest_memory import GuestMemory, Segments
from vgpu_backend.hostgpu.base import HostRanges

__all__ = ["PAGE_SIZE", "host_ranges", "translate_userptr"]

PAGE_SIZE: Final = 4096
_PAGE_MASK: Final = np.uint64(PAGE_SIZE - 1)

U64 = npt.NDArray[np.uint64]


def translate_userptr(memory: GuestMemory, addr: U64, length: U64, size: int,
                      max_bytes: int) -> Segments:
    """Validate a USERPTR entry list and translate it to coalesced guest segments.

    :raise GuestProtocolError: an entry that is zero-length, not page aligned, outside
        guest RAM or wrapping (INVALID_PARAMETER); entries that cover less than
        ``size`` rounded up to a page (INVALID_PARAMETER); more than ``max_bytes``
        (OUT_OF_MEMORY).
    """
    if addr.shape[0] == 0:
        raise GuestProtocolError("USERPTR blob without entries")
    # reductions only (no temporaries): this runs over up to a million entries
    low_bits = int(np.bitwise_or.reduce(addr)) | int(np.bitwise_or.reduce(length))
    if low_bits & (PAGE_SIZE - 1) or int(length.min()) == 0:
        bad = (length == 0) | ((addr | length) & _PAGE_MASK != 0)
        i = int(np.argmax(bad))
        raise GuestProtocolError(
            f"USERPTR entry {i} ({int(addr[i]):#x}+{int(length[i]):#x}) is empty or not "
            "page aligned")
    total = int(length.sum(dtype=np.uint64))  # < nr_entries * 2^32: no uint64 overflow
    needed = -(-size // PAGE_SIZE) * PAGE_SIZE
    if total < needed:
        raise GuestProtocolError(
            f"USERPTR entries cover {total} bytes, the blob needs {needed}")
    if total > max_bytes:
        raise GuestProtocolError(f"USERPTR blob of {total} bytes exceeds {max_bytes}",
                                 Resp.ERR_OUT_OF_MEMORY)
    return memory.translate(addr, length, lengths_checked=True).coalesced()


def host_ranges(memory: GuestMemory, segments: Segments) -> HostRanges:
    """The host-virtual ranges (and backing fd/offsets) of translated segments."""
    base = memory.host_base(segments.region_id)
    base += segments.offset
    fds, file_base = memory.file_base(segments.region_id)
    file_base += segments.offset
    return HostRanges(addr=base, length=segments.length, fd=fds, file_offset=file_base)
