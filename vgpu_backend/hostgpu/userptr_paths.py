"""The three ways scattered host ranges become one GPU buffer, their teardown, and the
start-up probes.

* **batch**: one ``ALLOC_MEMORY_OF_GPU`` with ``USERPTR|USERPTR_BATCH`` and a
  ``kfd_ioctl_userptr_ranges_data`` list (built with numpy) behind ``mmap_offset``;
* **alias**: reserve a contiguous host VA (``PROT_NONE``), map the guest-RAM file pages
  there with ``MAP_FIXED|MAP_SHARED`` (runs contiguous in the file coalesced), then one
  ordinary USERPTR allocation of the alias; impossible for ranges without a file, and
  for runs smaller than the file's pages (a hugetlb file maps in whole huge pages),
  see :func:`alias_refusal`;
* **per-range**: one ordinary USERPTR allocation per host-contiguous run, at
  consecutive GPU VAs.

:func:`register` either returns a complete :class:`Registration` (allocated and mapped
on every GPU) or raises :class:`HostGpuError` with nothing left behind; :func:`teardown`
undoes it and can be resumed after a failure.
"""

from __future__ import annotations

import errno
import logging
from dataclasses import dataclass, field

import numpy as np
import numpy.typing as npt

from protocol.wire import layout
from vgpu_backend.hostgpu import hostmem
from vgpu_backend.hostgpu import kfd_abi as abi
from vgpu_backend.hostgpu.base import HostGpuError, HostRanges, UserptrPath
from vgpu_backend.hostgpu.kfd_process import KfdProcess, UnmapError

__all__ = [
    "BatchProbe",
    "Registration",
    "alias_refusal",
    "coalesce_host",
    "probe_batch",
    "probe_userptr",
    "register",
    "teardown",
]

log = logging.getLogger(__name__)

_I64 = npt.NDArray[np.int64]
PAGE = abi.PAGE_SIZE

#: flags of every userptr BO; WRITABLE is added unless read-only
USERPTR_FLAGS = (abi.KFD_IOC_ALLOC_MEM_FLAGS_USERPTR | abi.KFD_IOC_ALLOC_MEM_FLAGS_NO_SUBSTITUTE
                 | abi.KFD_IOC_ALLOC_MEM_FLAGS_COHERENT)


@dataclass(eq=False)
class Registration:
    """Kernel-side state of one mapping (``GpuMapping.private``)."""

    process: KfdProcess
    path: UserptrPath
    va: int
    size: int
    #: BO handles, in GPU VA order
    handles: list[int]
    #: handles currently mapped on every GPU of the process
    mapped: set[int]
    #: host ranges as given (invalidation matches against these, also for alias)
    host_starts: _I64
    host_ends: _I64
    #: alias reservation ``(address, size)``, unmapped on teardown
    alias: tuple[int, int] | None = None
    #: GPUs already unmapped by a failed teardown, per handle (the resume point)
    unmapped_on: dict[int, int] = field(default_factory=dict)
    host_lo: int = field(init=False)
    host_hi: int = field(init=False)

    def __post_init__(self) -> None:
        self.host_lo = int(self.host_starts.min())
        self.host_hi = int(self.host_ends.max())

    def touches(self, start: int, end: int) -> bool:
        """A host range of this mapping intersects ``[start, end)``."""
        if self.host_lo >= end or self.host_hi <= start:
            return False
        return bool(((self.host_starts < end) & (self.host_ends > start)).any())


def coalesce_host(starts: _I64, sizes: _I64) -> tuple[_I64, _I64]:
    """Merge neighbours that are contiguous in host VA (order kept)."""
    if starts.size <= 1:
        return starts, sizes
    begin = np.ones(starts.size, dtype=bool)
    begin[1:] = starts[1:] != starts[:-1] + sizes[:-1]
    idx = np.flatnonzero(begin)
    return starts[idx], np.add.reduceat(sizes, idx)


def _coalesce_file(fds: npt.NDArray[np.int32], offsets: _I64, sizes: _I64
                   ) -> tuple[npt.NDArray[np.int32], _I64, _I64, _I64]:
    """Runs contiguous in the same file: ``(fd, file_offset, size, buffer_offset)``."""
    buffer_off = np.cumsum(sizes) - sizes
    begin = np.ones(sizes.size, dtype=bool)
    begin[1:] = (fds[1:] != fds[:-1]) | (offsets[1:] != offsets[:-1] + sizes[:-1])
    idx = np.flatnonzero(begin)
    return fds[idx], offsets[idx], np.add.reduceat(sizes, idx), buffer_off[idx]


@dataclass(eq=False)
class _Progress:
    """BOs of a registration in progress, for the rollback."""

    proc: KfdProcess
    va: int
    flags: int
    handles: list[int] = field(default_factory=list)
    mapped: set[int] = field(default_factory=set)

    def alloc_and_map(self, va: int, size: int, cpu: int, flags: int) -> int:
        """Allocate a BO, map it on every GPU; return the mmap_offset the kernel gave."""
        handle, offset = self.proc.alloc_userptr(va, size, cpu, flags)
        self.handles.append(handle)
        if offset != 0 and flags & abi.KFD_IOC_ALLOC_MEM_FLAGS_USERPTR_BATCH:
            return offset  # not a batch BO: the caller refuses it before mapping
        self.proc.map(handle)
        self.mapped.add(handle)
        return offset

    def undo(self) -> None:
        """Best-effort rollback: unmap and free what was done, newest first."""
        for handle in reversed(self.handles):
            try:
                if handle in self.mapped:
                    self.proc.unmap(handle)
                    self.mapped.discard(handle)
                self.proc.free(handle)
            except HostGpuError as e:  # the kernel frees it with the process at the latest
                log.error("rollback of handle %#x failed: %s", handle, e)
        self.handles.clear()


def _register_batch(job: _Progress, starts: _I64, sizes: _I64) -> None:
    starts, sizes = coalesce_host(starts, sizes)
    data = abi.UserptrRangesData(starts.astype(np.uint64), sizes.astype(np.uint64))
    offset = job.alloc_and_map(job.va, int(sizes.sum()), data.address,
                               job.flags | abi.KFD_IOC_ALLOC_MEM_FLAGS_USERPTR_BATCH)
    if offset != 0:
        # the kernel ignored USERPTR_BATCH and registered the range list itself
        raise HostGpuError("the kernel did not treat the allocation as a batch userptr "
                           f"(mmap_offset {offset:#x} returned); batch is not supported",
                           errno.EOPNOTSUPP, unsupported=True)


def _register_per_range(job: _Progress, starts: _I64, sizes: _I64) -> None:
    starts, sizes = coalesce_host(starts, sizes)
    gpu_vas = (job.va + np.cumsum(sizes) - sizes).tolist()
    # one allocation and one map per run: that is what this fallback is
    for gpu_va, start, size in zip(gpu_vas, starts.tolist(), sizes.tolist(), strict=True):
        job.alloc_and_map(gpu_va, size, start, job.flags)


def _file_runs(ranges: HostRanges) -> tuple[npt.NDArray[np.int32], _I64, _I64, _I64]:
    return _coalesce_file(ranges.fd.astype(np.int32), ranges.file_offset.astype(np.int64),
                          ranges.length.astype(np.int64))


def _misaligned(runs: tuple[npt.NDArray[np.int32], _I64, _I64, _I64]) -> str | None:
    """Why some file run cannot be mapped into the alias: on a hugetlb file, ``mmap``
    maps only whole huge pages at huge-page-aligned file offsets and addresses (the
    alias itself starts aligned to the largest page size)."""
    run_fd, run_off, run_size, run_at = runs
    for fd in np.unique(run_fd).tolist():
        page = hostmem.file_page_size(fd)
        mine = run_fd == fd
        if page > hostmem.PAGE_SIZE and ((run_off[mine] | run_size[mine] | run_at[mine])
                                          % page).any():
            return (f"guest RAM is on {page >> 10} KiB pages (hugetlb) and mmap maps only "
                    "whole ones at aligned addresses, but the buffer's runs are not")
    return None


def alias_refusal(ranges: HostRanges) -> str | None:
    """Why the alias path cannot map ``ranges`` (None: it can): a range without a
    backing file, or a run of a hugetlb file that is not whole, aligned huge pages."""
    if (ranges.fd < 0).any():
        return "a range has no backing file descriptor"
    return _misaligned(_file_runs(ranges))


def _reserve_aligned(length: int, align: int) -> int:
    """A ``PROT_NONE`` reservation of ``length`` bytes at a multiple of ``align``."""
    if align <= hostmem.PAGE_SIZE:
        return hostmem.reserve(length)
    raw = hostmem.reserve(length + align)
    start = -(-raw // align) * align
    if start > raw:
        hostmem.unmap(raw, start - raw)
    hostmem.unmap(start + length, raw + length + align - (start + length))
    return start


def _register_alias(job: _Progress, ranges: HostRanges, *, readonly: bool) -> tuple[int, int]:
    if (ranges.fd < 0).any():
        raise HostGpuError("alias path: a range has no backing file descriptor", errno.EINVAL)
    runs = _file_runs(ranges)
    refusal = _misaligned(runs)
    if refusal is not None:
        raise HostGpuError(f"alias path: {refusal}", errno.EINVAL)
    run_fd, run_off, run_size, run_at = runs
    total = int(ranges.length.sum())
    # huge-page files map only at huge-page-aligned addresses too
    alias = _reserve_aligned(total, max(
        hostmem.file_page_size(fd) for fd in np.unique(run_fd).tolist()))
    try:
        # one mmap per run contiguous in the file: a syscall each, no way around it
        for fd, off, size, at in zip(run_fd.tolist(), run_off.tolist(), run_size.tolist(),
                                     run_at.tolist(), strict=True):
            hostmem.map_file_fixed(alias + at, size, fd, off, writable=not readonly)
        job.alloc_and_map(job.va, total, alias, job.flags)
    except BaseException as e:
        job.undo()  # free the BO before its memory goes away
        hostmem.unmap(alias, total)
        if isinstance(e, OSError):
            raise HostGpuError(f"alias path: {e} ({run_fd.size} file runs)", e.errno) from e
        raise
    return alias, total


def register(proc: KfdProcess, path: UserptrPath, ranges: HostRanges, *, starts: _I64,
             sizes: _I64, va: int, readonly: bool) -> Registration:
    """Register ``ranges`` at GPU VA ``va`` by ``path``, mapped on every GPU of ``proc``.

    ``starts``/``sizes`` are ``ranges.addr``/``ranges.length`` as validated int64.
    """
    flags = USERPTR_FLAGS | (0 if readonly else abi.KFD_IOC_ALLOC_MEM_FLAGS_WRITABLE)
    job = _Progress(proc, va, flags)
    alias = None
    try:
        if path is UserptrPath.BATCH:
            _register_batch(job, starts, sizes)
        elif path is UserptrPath.PER_RANGE or coalesce_host(starts, sizes)[0].size == 1:
            # (alias of ranges already contiguous in host VA: they are their own alias,
            # one ordinary USERPTR allocation; this also covers host buffers without fd)
            _register_per_range(job, starts, sizes)
        else:
            alias = _register_alias(job, ranges, readonly=readonly)
    except BaseException:
        job.undo()
        raise
    return Registration(process=proc, path=path, va=va, size=int(sizes.sum()),
                        handles=job.handles, mapped=job.mapped, host_starts=starts,
                        host_ends=starts + sizes, alias=alias)


def teardown(reg: Registration) -> None:
    """Unmap and free every BO, then drop the alias and the GPU VA range.

    Resumable: on failure it raises with the remaining BOs recorded in ``reg``.
    """
    proc = reg.process
    while reg.handles:
        handle = reg.handles[-1]
        if handle in reg.mapped:
            try:
                proc.unmap(handle, done=reg.unmapped_on.get(handle, 0))
            except UnmapError as e:
                reg.unmapped_on[handle] = e.n_success
                if e.n_success < len(proc.gpu_ids):
                    raise
                # every GPU is unmapped; only the final wait failed: go on to free
                log.warning("%s; freeing anyway", e)
            reg.mapped.discard(handle)
            reg.unmapped_on.pop(handle, None)
        proc.free(handle)
        reg.handles.pop()
    if reg.alias is not None:
        hostmem.unmap(*reg.alias)
        reg.alias = None
    if reg.size:
        proc.va.free(reg.va)
        reg.size = 0


# --- probes ------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class BatchProbe:
    """Result of the USERPTR_BATCH probe."""

    supported: bool
    detail: str


def probe_batch(proc: KfdProcess) -> BatchProbe:
    """Find out whether the kernel implements USERPTR_BATCH, harmlessly.

    A one-page batch allocation whose range list sits at the start of a page-aligned
    two-page probe buffer and names the second page.  A batch kernel returns
    ``mmap_offset`` 0; a pre-batch kernel ignores bit 22 and registers the first
    ``size`` bytes at ``mmap_offset`` -- the list's own page of the probe buffer -- as a
    plain userptr and returns a non-zero DRM mmap offset.  The BO is freed either way.
    """
    buf = hostmem.map_anonymous(2 * PAGE)
    va = proc.va.allocate(PAGE)
    try:
        page = hostmem.view(buf, PAGE)
        layout(abi.UserptrRangesHeader).struct.pack_into(page.data, 0, 1, 0)
        layout(abi.UserptrRange).struct.pack_into(page.data, abi.header_size(), buf + PAGE, PAGE)
        flags = (abi.KFD_IOC_ALLOC_MEM_FLAGS_USERPTR | abi.KFD_IOC_ALLOC_MEM_FLAGS_USERPTR_BATCH
                 | abi.KFD_IOC_ALLOC_MEM_FLAGS_NO_SUBSTITUTE)
        try:
            handle, offset = proc.alloc_userptr(va, PAGE, buf, flags)
        except HostGpuError as e:
            return BatchProbe(False, f"probe allocation refused: {e}")
        proc.free(handle)
        if offset == 0:
            return BatchProbe(True, "probe allocation returned mmap_offset 0")
        return BatchProbe(False, f"kernel ignored USERPTR_BATCH (returned mmap offset "
                                 f"{offset:#x}): pre-batch kernel")
    finally:
        proc.va.free(va)
        hostmem.unmap(buf, 2 * PAGE)


def probe_userptr(proc: KfdProcess) -> tuple[bool, str]:
    """Whether a plain one-page USERPTR allocation works in ``proc`` (it does not on a
    secondary process: EOPNOTSUPP)."""
    buf = hostmem.map_anonymous(PAGE)
    va = proc.va.allocate(PAGE)
    try:
        try:
            handle, _ = proc.alloc_userptr(va, PAGE, buf, USERPTR_FLAGS)
        except HostGpuError as e:
            return False, str(e)
        proc.free(handle)
        return True, "plain USERPTR allocation accepted"
    finally:
        proc.va.free(va)
        hostmem.unmap(buf, PAGE)
