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

@contextmanager
def aliased(addr: I64, length: I64, file_of: FileOf | None, *,
            writable: bool) -> Iterator[npt.NDArray[np.uint8] | None]:
    """A contiguous uint8 view of the runs while the block runs, or None."""
    base = _map(addr, length, file_of, writable=writable) if file_of is not None else None
    if base is None:
        yield None
        return
    total = int(length.sum())
    try:
        yield hostmem.view(base[0], total)
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
    granule = max(hostmem.file_page_size(fd) for fd in np.unique(fds).tolist())
    # the first run may start and the last end inside a page: map those pages whole
    head = int(offsets[0]) % granule
    offsets = offsets.copy()
    length = length.copy()
    offsets[0] -= head
    length[0] += head
    length[-1] += -int(offsets[-1] + length[-1]) % granule
    if ((offsets | length) % granule).any():
        return None  # a run inside the buffer does not cover whole pages
    span = int(length.sum()) + granule
    try:
        raw = hostmem.reserve(span)
    except OSError as err:
        log.debug("alias view of %d runs: %s", count, err)
        return None
    start = -(-raw // granule) * granule
    at = start
    try:
        for fd, offset, size in zip(fds.tolist(), offsets.tolist(), length.tolist(),
                                    strict=True):
            hostmem.map_file_fixed(at, size, fd, offset, writable=writable, populate=True)
            at += size
    except OSError as err:
        hostmem.unmap(raw, span)
        log.debug("alias view of %d runs: %s", count, err)
        return None
    return start + head, raw, span
