"""Contiguous host views of scattered guest memory, without copying: the guest-RAM file
pages behind a buffer's runs mapped at consecutive host addresses (``MAP_FIXED`` into a
reservation), as the alias host path does for the GPU.

Kernels that need an operand contiguous (BLAS) use such a view instead of staging a
copy.  It is possible when every run is backed by a guest-RAM file and starts and ends
on the file's page granule (2 MiB for hugetlb guest RAM, 4 KiB otherwise), and
worthwhile when the runs are few and large; otherwise :func:`aliased` yields None and
the kernel stages.
"""

from __future__ import annotations

import logging
import os
import stat
from collections.abc import Callable, Iterator
from contextlib import contextmanager

import numpy as np
import numpy.typing as npt

from vgpu_backend.hostgpu import hostmem

__all__ = ["MAX_ALIAS_RUNS", "MIN_ALIAS_RUN", "FileOf", "aliased"]

log = logging.getLogger(__name__)

I64 = npt.NDArray[np.int64]
#: host runs -> (backing fds, file offsets), or None when not all are file-backed
FileOf = Callable[[I64, I64], "tuple[npt.NDArray[np.int32], I64] | None"]
#: more runs than this are not worth an mmap each
MAX_ALIAS_RUNS = 4096
#: runs shorter than this on average are cheaper to stage than to map
MIN_ALIAS_RUN = 256 << 10
_HUGE = 2 << 20

@contextmanager
def aliased(addr: I64, length: I64, file_of: FileOf | None, *,
            writable: bool) -> Iterator[npt.NDArray[np.uint8] | None]:
    """A contiguous uint8 view of the runs while the block runs, or None."""
    base = _map(addr, length, file_of, writable=writable) if file_of is not None else None
    if base is None:
        yield None
        return
    view = hostmem.view(base[0], int(length.sum()))
    view.flags.writeable = writable  # a stray write raises instead of faulting
    try:
        yield view
    finally:
        hostmem.unmap(base[1], base[2])


def _map(addr: I64, length: I64, file_of: FileOf,
         *, writable: bool) -> tuple[int, int, int] | None:
    """(view address, reservation address, reservation length), or None."""
    count = int(length.shape[0])
    total = int(length.sum())
    if count < 2 or count > MAX_ALIAS_RUNS or total < MIN_ALIAS_RUN * count:
        return None
    backing = file_of(addr, length)
    if backing is None:
        return None
    fds, offsets = backing
    files = np.unique(fds).tolist()
    if not all(stat.S_ISREG(os.fstat(fd).st_mode) for fd in files):
        return None  # memfd, shmem and hugetlbfs files only (a DAX device maps its own way)
    granules = {hostmem.file_page_size(fd) for fd in files}
    if len(granules) != 1:
        return None
    granule = granules.pop()
    # the first run may start and the last end inside a page: map those pages whole
    head = int(offsets[0]) % granule
    offsets = offsets.copy()
    length = length.copy()
    offsets[0] -= head
    length[0] += head
    length[-1] += -int(offsets[-1] + length[-1]) % granule
    if ((offsets | length) % granule).any():
        return None  # a run inside the buffer does not cover whole pages
    # 2 MiB-aligned runs of a 4 KiB-page file (shmem THP) keep their huge pages only at
    # 2 MiB-aligned addresses
    align = max(granule, _HUGE) if not ((offsets | length) % _HUGE).any() else granule
    span = int(length.sum()) + align
    try:
        raw = hostmem.reserve(span)
    except OSError as err:
        log.debug("alias view of %d runs: %s", count, err)
        return None
    start = -(-raw // align) * align
    at = start
    for fd, offset, size in zip(fds.tolist(), offsets.tolist(), length.tolist(),
                                strict=True):
        try:
            hostmem.map_file_fixed(at, size, fd, offset, writable=writable, populate=True)
        except OSError as err:
            # [at, at+size) may be a hole now: give back only what is still ours
            if at > raw:
                hostmem.unmap(raw, at - raw)
            if raw + span > at + size:
                hostmem.unmap(at + size, raw + span - at - size)
            log.debug("alias view of %d runs: %s", count, err)
            return None
        at += size
    return start + head, raw, span
